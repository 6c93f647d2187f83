"""Kubernetes backend: a recipe becomes a KubeRay `RayJob`, created through the
official `kubernetes` Python client.

It follows the `ray.io/v1` RayJob API of KubeRay v1.5.1, the first release with
`rayClusterSpec.authOptions` (Ray >= 2.52 token authentication). Three objects:

- a ConfigMap holding the resolved recipe, mounted read-only at /etc/tunefleet;
- a ReadWriteMany PersistentVolumeClaim mounted at `output_dir` in every pod, so
  checkpoints, metrics and prepared data are shared and outlive the job;
- the RayJob: a head group that runs the driver (`tunefleet launch`, submitted by
  KubeRay's submitter Job) but never a training worker (`num-cpus: 0`), and one
  worker group of `parallelism.num_nodes` pods, each with `workers_per_node` x
  (`cpus_per_worker` CPUs, one GPU with `use_gpu`, `memory_per_worker`).

Restarts: inside one Ray cluster, Ray Train restarts the worker group up to
`fault_tolerance.max_restarts` times (the driver's own FailureConfig); the
RayJob's `backoffLimit` is the same number, for attempts KubeRay retries on a
new Ray cluster (lost head pod, preemption), each resuming from the latest
checkpoint on the claim. Preemption: the head pod's preStop hook sends SIGTERM
to the driver and waits, so it checkpoints and exits 75 within
`preemption_grace_s`; the pod's termination grace period covers that.

No recipe value reaches a shell: the entrypoint is a constant (the submitter puts
it through `bash -c` and Ray through `sh -c`), the recipe travels as ConfigMap
data, and `$` in environment values is doubled so Kubernetes does not expand
`$(VAR)` in them.
"""

from __future__ import annotations

import codecs
import json
import math
import os
import re
import shlex
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from decimal import Decimal
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml

from tunefleet.cluster.backend import ClusterError, JobStatus

KUBERAY_VERSION = "v1.5.1"
GROUP, API_VERSION, PLURAL = "ray.io", "v1", "rayjobs"
JOB_PREFIX = "kubernetes:"
RECIPE_DIR = "/etc/tunefleet"
RECIPE_FILE = "recipe.yaml"
DRIVER_ARGV = ("tunefleet", "launch", f"{RECIPE_DIR}/{RECIPE_FILE}", "--address", "auto", "--resume", "auto")
SHUTDOWN_MARGIN_S = 30  # after the driver's checkpoint grace: stop Ray before Kubernetes' SIGKILL
FINAL_STATES = frozenset({"Complete", "Failed"})  # jobDeploymentStatus values KubeRay never leaves
# Head preStop: SIGTERM the driver, the process whose arguments include `launch /etc/tunefleet/recipe.yaml`
# as two arguments (so not a shell running it), then wait for it to exit. `recipe[.]yaml` keeps this script's
# own command line from matching; no `$(` or `$$`, which Kubernetes would expand in a container's commands.
PRESTOP_SCRIPT = """\
pids=
for d in /proc/[0-9]*; do
  if { tr '\\0' '|' < "$d/cmdline"; } 2>/dev/null | grep -q '|launch|/etc/tunefleet/recipe[.]yaml|'; then
    pids="$pids ${d#/proc/}"
  fi
done
[ -n "$pids" ] || exit 0
kill -TERM $pids 2>/dev/null
for p in $pids; do
  while kill -0 "$p" 2>/dev/null; do sleep 1; done
done
"""


# --------------------------------------------------------------------------- settings
def effective(recipe: Any, options: Any) -> tuple[Any, Any]:
    """The recipe carrying `options`, its effective `cluster.kubernetes` (validated by the CLI with
    `--namespace`/`--image` laid over it), so the pods run exactly what was submitted."""
    kube = options if options is not None else recipe.cluster.kubernetes
    if kube is None or not kube.image:
        raise ClusterError("cluster.kubernetes.image: set the container image (tunefleet installed, Ray "
                           f"{ray_version()}) in the recipe, or pass --image")
    cluster = recipe.cluster.model_copy(update={"kubernetes": kube})
    return recipe.model_copy(update={"cluster": cluster}), kube


def job_name(recipe: Any) -> str:
    """A DNS-1035 name from the run name; KubeRay appends suffixes, so it stays short."""
    slug = re.sub(r"[^a-z0-9]+", "-", recipe.name.lower()).strip("-")[:40].rstrip("-")
    return slug if slug[:1].isalpha() else f"tf-{slug}".rstrip("-")


def ray_version() -> str:
    return version("ray")


def parse_job_id(job_id: str) -> tuple[str, str]:
    """`<namespace>/<name>`, with or without the `kubernetes:` prefix -> (namespace, name)."""
    namespace, _, name = job_id.removeprefix(JOB_PREFIX).partition("/")
    if not namespace or not name or "/" in name:
        raise ClusterError(f"{job_id!r} is not a Kubernetes job id; expected {JOB_PREFIX}<namespace>/<name>")
    return namespace, name


# --------------------------------------------------------------------------- manifests
def manifests(recipe: Any, options: Any = None) -> list[dict]:
    """ConfigMap, PersistentVolumeClaim and RayJob for one run, in creation order."""
    recipe, kube = effective(recipe, options)
    name = job_name(recipe)
    meta = {"namespace": kube.namespace, "labels": _labels(name)}
    claim = kube.pvc_name or f"{name}-shared"
    configmap = {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{name}-recipe", **meta},
        "data": {RECIPE_FILE: recipe_yaml(recipe)},
    }
    pvc_spec = {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": kube.pvc_size}}}
    if kube.storage_class:
        pvc_spec["storageClassName"] = kube.storage_class
    pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim, **meta}, "spec": pvc_spec}
    return [configmap, pvc, rayjob(recipe, kube, name, claim=claim, configmap=f"{name}-recipe")]


def recipe_yaml(recipe: Any) -> str:
    """What the recipe set, paths resolved and CLI flags folded in; `tunefleet launch` in the pod fills
    the defaults as a local launch does (a full dump would not load: some checks look at which keys are set)."""
    return yaml.safe_dump(recipe.model_dump(mode="json", exclude_unset=True), sort_keys=False)


def rayjob(recipe: Any, kube: Any, name: str, *, claim: str, configmap: str) -> dict:
    annotations = {"tunefleet.dev/kuberay-api": KUBERAY_VERSION,
                   "tunefleet.dev/recipe-fingerprint": recipe.fingerprint()}
    return {
        "apiVersion": f"{GROUP}/{API_VERSION}", "kind": "RayJob",
        "metadata": {"name": name, "namespace": kube.namespace, "labels": _labels(name), "annotations": annotations},
        "spec": {
            "entrypoint": shlex.join(DRIVER_ARGV),
            "submissionMode": "K8sJobMode",
            "backoffLimit": recipe.fault_tolerance.max_restarts,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": kube.keep_finished_s,
            "rayClusterSpec": _cluster_spec(recipe, kube, _volumes(kube, claim, configmap), _labels(name)),
        },
    }


def _cluster_spec(recipe: Any, kube: Any, volumes: list[dict], labels: dict) -> dict:
    par = recipe.parallelism
    container = _container("ray-worker", recipe, kube, worker_resources(recipe, kube))
    head = _head_template(recipe, kube, volumes, labels)
    worker_params = {"num-cpus": str(par.workers_per_node * par.cpus_per_worker)}
    if par.use_gpu:
        worker_params["num-gpus"] = str(par.workers_per_node)
    return {
        "rayVersion": ray_version(),
        "enableInTreeAutoscaling": False,
        "authOptions": {"mode": "token"},
        "headGroupSpec": {"rayStartParams": {"num-cpus": "0"}, "template": head},
        "workerGroupSpecs": [{
            "groupName": "workers", "replicas": par.num_nodes, "minReplicas": par.num_nodes,
            "maxReplicas": par.num_nodes, "rayStartParams": worker_params,
            "template": _pod_template(kube, labels, volumes, container),
        }],
    }


def _head_template(recipe: Any, kube: Any, volumes: list[dict], labels: dict) -> dict:
    """The driver's pod: on shutdown, preStop lets the driver checkpoint within its grace period."""
    container = _container("ray-head", recipe, kube, _head_resources(kube))
    container["lifecycle"] = {"preStop": {"exec": {"command": ["/bin/sh", "-c", PRESTOP_SCRIPT]}}}
    template = _pod_template(kube, labels, volumes, container)
    grace_s = math.ceil(recipe.fault_tolerance.preemption_grace_s) + SHUTDOWN_MARGIN_S
    template["spec"]["terminationGracePeriodSeconds"] = grace_s
    return template


def worker_resources(recipe: Any, kube: Any) -> dict:
    """One worker pod per node: requests for all its workers; GPUs as limits (requests default to them)."""
    par = recipe.parallelism
    memory = _times(kube.memory_per_worker, par.workers_per_node)
    resources = {"requests": {"cpu": str(par.workers_per_node * par.cpus_per_worker), "memory": memory},
                 "limits": {"memory": memory}}
    if par.use_gpu:
        resources["limits"]["nvidia.com/gpu"] = str(par.workers_per_node)
    return resources


def _head_resources(kube: Any) -> dict:
    cpu = str(int(kube.head_cpus)) if float(kube.head_cpus).is_integer() else f"{round(kube.head_cpus * 1000)}m"
    return {"requests": {"cpu": cpu, "memory": kube.head_memory}, "limits": {"memory": kube.head_memory}}


def _container(name: str, recipe: Any, kube: Any, resources: dict) -> dict:
    mounts = shared_mounts(recipe) + [
        {"name": "recipe", "mountPath": RECIPE_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    container = {"name": name, "image": kube.image, "env": _env(recipe, kube), "resources": resources,
                 "volumeMounts": mounts}
    if kube.env_from_secrets:
        container["envFrom"] = [{"secretRef": {"name": secret}} for secret in kube.env_from_secrets]
    return container


def _env(recipe: Any, kube: Any) -> list[dict]:
    cache = Path(recipe.output_dir) / ".cache"
    env = [
        {"name": "TUNEFLEET_CACHE", "value": _literal(str(cache / "tunefleet"))},
        {"name": "HF_HOME", "value": _literal(str(cache / "huggingface"))},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if kube.wandb_secret:
        ref = {"name": kube.wandb_secret, "key": kube.wandb_secret_key}
        env.append({"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": ref}})
    for item in kube.secret_env:  # by reference: a manifest never holds a secret's value
        env.append({"name": item.name, "valueFrom": {"secretKeyRef": {"name": item.secret, "key": item.key}}})
    return env


def shared_mounts(recipe: Any) -> list[dict]:
    """The claim at `output_dir`, plus sub-folders of it for checkpoint/cache dirs that live elsewhere."""
    mounts = [{"name": "shared", "mountPath": recipe.output_dir}]
    elsewhere = {"checkpoint-dir": recipe.checkpoint_dir, "data-cache-dir": recipe.data.cache_dir}
    for sub_path, path in elsewhere.items():
        if path and not Path(path).is_relative_to(recipe.output_dir):
            mounts.append({"name": "shared", "mountPath": path, "subPath": sub_path})
    return mounts


def _pod_template(kube: Any, labels: dict, volumes: list[dict], container: dict) -> dict:
    spec: dict = {"containers": [container], "volumes": volumes}
    if kube.service_account:
        spec["serviceAccountName"] = kube.service_account
    if kube.node_selector:
        spec["nodeSelector"] = dict(kube.node_selector)
    if kube.tolerations:
        names = {"toleration_seconds": "tolerationSeconds"}
        spec["tolerations"] = [{names.get(k, k): v for k, v in t.model_dump(exclude_none=True).items()}
                               for t in kube.tolerations]
    return {"metadata": {"labels": dict(labels)}, "spec": spec}


def _volumes(kube: Any, claim: str, configmap: str) -> list[dict]:
    shm = {"medium": "Memory", **({"sizeLimit": kube.shm_size} if kube.shm_size else {})}
    return [
        {"name": "shared", "persistentVolumeClaim": {"claimName": claim}},
        {"name": "recipe", "configMap": {"name": configmap}},
        {"name": "dshm", "emptyDir": shm},
    ]


def _labels(name: str) -> dict:
    return {"app.kubernetes.io/managed-by": "tunefleet", "tunefleet.dev/run": name}


def _literal(value: str) -> str:
    """Kubernetes expands `$(VAR)` in env values and reduces `$$` to `$`: double every `$`."""
    return value.replace("$", "$$")


def _times(quantity: str, count: int) -> str:
    number, unit = re.fullmatch(r"([0-9.]+)(\D*)", quantity).groups()
    return f"{Decimal(number) * count:f}{unit}"


def image_paths(recipe: Any) -> list[str]:
    """Input files the pods read from the image (or a volume): submitting does not ship them."""
    paths = [recipe.model.path] if recipe.model.path.startswith("/") else []
    paths += [source.path for source in recipe.data.sources if source.path]
    if recipe.data.eval:
        paths += [path for path in (recipe.data.eval.path, recipe.data.eval.reference_data) if path]
    return paths


def to_yaml(recipe: Any, objects: list[dict]) -> str:
    """The manifests as one YAML stream, for `--dry-run` and `kubectl apply -f`."""
    header = [f"# tunefleet run {recipe.name}: KubeRay RayJob (ray.io/v1, KubeRay {KUBERAY_VERSION} or newer)"]
    if paths := image_paths(recipe):
        header.append("# The image (or a volume) must hold these inputs:")
        header += [f"#   {json.dumps(path)}" for path in paths]  # json: no raw line break ends the comment
    body = yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, width=1000)
    return "\n".join(header) + "\n" + body


class _Dumper(yaml.SafeDumper):
    """No `&id001` aliases for shared lists; multi-line strings (recipe, preStop) as `|` blocks."""

    def ignore_aliases(self, data) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str):
    # PyYAML falls back to a quoted style by itself when a block cannot hold the text exactly.
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


# --------------------------------------------------------------------------- API
def _clients():
    """CoreV1Api and CustomObjectsApi: in-cluster credentials inside a pod, else kubeconfig."""
    from kubernetes import client, config

    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            cfg = client.Configuration()
            config.load_incluster_config(client_configuration=cfg)
            api = client.ApiClient(cfg)
        else:
            api = config.new_client_from_config(config_file=os.environ.get("KUBECONFIG"), persist_config=False)
    except config.ConfigException as exc:
        raise ClusterError(f"no Kubernetes credentials ({exc}); set KUBECONFIG or run inside a cluster") from None
    return client.CoreV1Api(api), client.CustomObjectsApi(api)


@contextmanager
def _api_errors(what: str):
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        yield
    except ApiException as exc:
        raise ClusterError(f"{what}: the Kubernetes API answered {exc.status} {exc.reason}: {_message(exc)}") from None
    except HTTPError as exc:
        raise ClusterError(f"{what}: cannot reach the Kubernetes API server ({exc}); check KUBECONFIG") from None


def _message(exc) -> str:
    try:
        return json.loads(exc.body).get("message", "")
    except (TypeError, ValueError, AttributeError):
        return str(exc.body or "")


def _status_of(exc) -> int | None:
    return getattr(exc, "status", None)


def submit_manifests(objects: list[dict]) -> str:
    """Create the ConfigMap (replacing a stale one), the claim if missing, then the RayJob; return
    `<namespace>/<name>`. A finished RayJob of that name is replaced; a live one is refused, since two
    runs must not write to one folder."""
    configmap, claim, job = objects
    namespace, name = job["metadata"]["namespace"], job["metadata"]["name"]
    core, custom = _clients()
    with _api_errors(f"submitting RayJob {namespace}/{name}"):
        _clear_finished(custom, namespace, name)
        _apply_configmap(core, namespace, configmap)
        _ensure_claim(core, namespace, claim)
        custom.create_namespaced_custom_object(GROUP, API_VERSION, namespace, PLURAL, job)
    return f"{namespace}/{name}"


def _clear_finished(custom, namespace: str, name: str, timeout_s: float = 120, poll_s: float = 1) -> None:
    from kubernetes import client

    job = _get_or_none(custom, namespace, name)
    if job is None:
        return
    state = (job.get("status") or {}).get("jobDeploymentStatus") or "New"
    if state not in FINAL_STATES:
        raise ClusterError(f"RayJob {namespace}/{name} is {state}; `tunefleet cancel {JOB_PREFIX}{namespace}/{name}` "
                           "first (the claim keeps its checkpoints), or rename the run")
    custom.delete_namespaced_custom_object(
        GROUP, API_VERSION, namespace, PLURAL, name, body=client.V1DeleteOptions(propagation_policy="Foreground"))
    deadline = time.monotonic() + timeout_s
    while _get_or_none(custom, namespace, name) is not None:
        if time.monotonic() > deadline:
            raise ClusterError(f"the finished RayJob {namespace}/{name} is still being deleted after "
                               f"{timeout_s:.0f}s; submit again in a moment")
        time.sleep(poll_s)


def _get_or_none(custom, namespace: str, name: str) -> dict | None:
    from kubernetes.client.exceptions import ApiException

    try:
        return custom.get_namespaced_custom_object(GROUP, API_VERSION, namespace, PLURAL, name)
    except ApiException as exc:
        if _status_of(exc) != 404:
            raise
        return None


def _apply_configmap(core, namespace: str, configmap: dict) -> None:
    from kubernetes.client.exceptions import ApiException

    try:
        core.create_namespaced_config_map(namespace, configmap)
    except ApiException as exc:
        if _status_of(exc) != 409:
            raise
        core.replace_namespaced_config_map(configmap["metadata"]["name"], namespace, configmap)


def _ensure_claim(core, namespace: str, claim: dict) -> None:
    from kubernetes.client.exceptions import ApiException

    try:
        core.read_namespaced_persistent_volume_claim(claim["metadata"]["name"], namespace)
    except ApiException as exc:
        if _status_of(exc) != 404:
            raise
        core.create_namespaced_persistent_volume_claim(namespace, claim)


def status(job_id: str) -> JobStatus:
    """KubeRay's view: `state` is the RayJob's jobDeploymentStatus; the Ray job's own status is the reason."""
    namespace, name = parse_job_id(job_id)
    _, custom = _clients()
    st = _read_rayjob(custom, namespace, name).get("status") or {}
    deployment = st.get("jobDeploymentStatus") or "New"
    reason = "; ".join(part for part in (
        f"Ray job {st['jobStatus']}" if st.get("jobStatus") else "", st.get("reason", ""), st.get("message", ""),
    ) if part)
    return JobStatus(
        job_id=f"{JOB_PREFIX}{namespace}/{name}", name=name, state=deployment, reason=reason or None,
        nodes=st.get("rayClusterName") or None, restarts=int(st.get("failed") or 0),
        finished=deployment in FINAL_STATES,
    )


def _read_rayjob(custom, namespace: str, name: str) -> dict:
    with _api_errors(f"reading RayJob {namespace}/{name}"):
        return custom.get_namespaced_custom_object(GROUP, API_VERSION, namespace, PLURAL, name)


def logs(job_id: str, follow: bool) -> Iterator[str]:
    """The driver's output as KubeRay's submitter pod streams it (the head pod's before that pod exists);
    with `follow`, until the pod's container ends."""
    namespace, name = parse_job_id(job_id)
    core, custom = _clients()
    with _api_errors(f"reading logs of RayJob {namespace}/{name}"):
        pod = _log_pod(core, custom, namespace, name)
        response = core.read_namespaced_pod_log(pod, namespace, follow=follow, _preload_content=False)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    try:
        for chunk in response.stream(4096, decode_content=True):
            if text := decoder.decode(chunk):
                yield text
        if tail := decoder.decode(b"", final=True):
            yield tail
    finally:
        response.release_conn()


def _log_pod(core, custom, namespace: str, name: str) -> str:
    pods = core.list_namespaced_pod(namespace, label_selector=f"job-name={name}").items
    if not pods:
        cluster = (_read_rayjob(custom, namespace, name).get("status") or {}).get("rayClusterName")
        selector = f"ray.io/cluster={cluster},ray.io/node-type=head"
        pods = core.list_namespaced_pod(namespace, label_selector=selector).items if cluster else []
    if not pods:
        raise ClusterError(f"RayJob {namespace}/{name} has no pod yet; `tunefleet status` says what it waits for")
    return max(pods, key=lambda pod: str(pod.metadata.creation_timestamp or "")).metadata.name


def cancel(job_id: str) -> JobStatus:
    """Delete a live RayJob: its Ray cluster and submitter go with it (foreground deletion) and the pods
    stop gracefully (the head's preStop lets the driver checkpoint). The claim and its checkpoints stay;
    a finished RayJob is left as it is (the next submit of the run replaces it)."""
    from kubernetes import client

    current = status(job_id)
    if current.finished:
        return current
    namespace, name = parse_job_id(job_id)
    _, custom = _clients()
    with _api_errors(f"cancelling RayJob {namespace}/{name}"):
        custom.delete_namespaced_custom_object(
            GROUP, API_VERSION, namespace, PLURAL, name, body=client.V1DeleteOptions(propagation_policy="Foreground"))
    return current


# --------------------------------------------------------------------------- the backend (see backend.Backend)
name = "kubernetes"


def render(recipe: Any, recipe_path: str, overrides: Sequence[str], options: Any) -> str:
    """The manifests `submit` would apply, as one YAML stream."""
    return to_yaml(recipe, manifests(recipe, options))


def submit(recipe: Any, recipe_path: str, overrides: Sequence[str], options: Any) -> str:
    """Apply the manifests; the RayJob as `namespace/name`."""
    return submit_manifests(manifests(recipe, options))
