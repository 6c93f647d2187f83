"""The Kubernetes backend, without a Kubernetes cluster (none can run here).

- Core objects (ConfigMap, PersistentVolumeClaim, and the head/worker pod templates
  inside the RayJob as `PodTemplate` and `Pod`) are validated offline by
  kubernetes-validate with `--strict`, against Kubernetes K8S_VERSION.
- The RayJob is validated with jsonschema against k8s_schemas/rayjob-v1.json, which
  this project wrote from KubeRay's documented ray.io/v1 API (KubeRay v1.5.1).
- Submission, status, logs and cancel run the official `kubernetes` client against
  FakeKube, a small HTTP server in this file that serves the endpoints the client
  calls and records every request.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tunefleet.cluster import kubernetes as k8s
from tunefleet.cluster.backend import ClusterError
from tunefleet.launcher.config import SlurmConfig, load_recipe

K8S_VERSION = "1.33"
SCHEMA = json.loads((Path(__file__).parent / "k8s_schemas" / "rayjob-v1.json").read_text())
WANDB_KEY = "wandb-key-that-must-never-leave-this-machine"
BASE = {
    "name": "demo_Run.1",
    "output_dir": "run",
    "model": {"path": "tiny:llama"},
    "data": {"sources": [{"path": "data/train.jsonl"}]},
    "train": {"max_steps": 10},
    "parallelism": {"num_nodes": 2, "workers_per_node": 2, "cpus_per_worker": 3},
    "checkpoint": {"every_steps": 5},
    "fault_tolerance": {"max_restarts": 3, "preemption_grace_s": 45},
    "cluster": {"kubernetes": {"namespace": "ml", "image": "registry.example/tunefleet:0.1", "wandb_secret": "wandb"}},
}


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def make_recipe(tmp_path: Path, extra: dict | None = None, overrides: list[str] = ()):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(merge(BASE, extra or {})))
    return load_recipe(path, list(overrides)), path


def render(recipe) -> list[dict]:
    return k8s.manifests(recipe, recipe.cluster.kubernetes)


def shipped_recipe(configmap: dict, tmp_path: Path):
    """The recipe as `tunefleet launch /etc/tunefleet/recipe.yaml` in the head pod loads it."""
    folder = tmp_path / "etc-tunefleet"
    folder.mkdir(exist_ok=True)
    (folder / "recipe.yaml").write_text(configmap["data"]["recipe.yaml"])
    return load_recipe(folder / "recipe.yaml")


def pod_templates(objects: list[dict]) -> dict[str, dict]:
    cluster = objects[2]["spec"]["rayClusterSpec"]
    return {"head": cluster["headGroupSpec"]["template"], "worker": cluster["workerGroupSpecs"][0]["template"]}


def as_core_objects(objects: list[dict]) -> list[dict]:
    """ConfigMap, PVC, and each RayJob pod template as a `PodTemplate` and as a `Pod`."""
    out = list(objects[:2])
    for role, template in pod_templates(objects).items():
        meta = {"name": f"{objects[2]['metadata']['name']}-{role}", "namespace": "ml"}
        out.append({"apiVersion": "v1", "kind": "PodTemplate", "metadata": meta, "template": template})
        out.append({"apiVersion": "v1", "kind": "Pod", "metadata": {**meta, **template["metadata"]},
                    "spec": template["spec"]})
    return out


def k8s_expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' expansion of env values and commands, left to right: `$$` -> `$`, `$(NAME)` -> env[NAME]."""
    return re.sub(r"\$\$|\$\(([^)]*)\)", lambda m: "$" if m[0] == "$$" else env.get(m[1], m[0]), text)


# --------------------------------------------------------------------------- rendering
def test_layout_resources_restarts(tmp_path):
    recipe, _ = make_recipe(tmp_path, {"parallelism": {"use_gpu": True}})
    configmap, pvc, job = render(recipe)
    spec, cluster = job["spec"], job["spec"]["rayClusterSpec"]
    head, worker = cluster["headGroupSpec"], cluster["workerGroupSpecs"][0]
    assert job["metadata"]["name"] == "demo-run-1" and job["metadata"]["namespace"] == "ml"
    assert shlex.split(spec["entrypoint"]) == list(k8s.DRIVER_ARGV)
    assert (spec["submissionMode"], spec["backoffLimit"], spec["shutdownAfterJobFinishes"]) == ("K8sJobMode", 3, True)
    assert head["rayStartParams"] == {"num-cpus": "0"}  # the head never hosts a training worker
    assert (worker["replicas"], worker["minReplicas"], worker["maxReplicas"]) == (2, 2, 2)
    assert worker["rayStartParams"] == {"num-cpus": "6", "num-gpus": "2"}
    resources = worker["template"]["spec"]["containers"][0]["resources"]
    assert resources == {"requests": {"cpu": "6", "memory": "32Gi"},
                         "limits": {"memory": "32Gi", "nvidia.com/gpu": "2"}}
    head_spec = head["template"]["spec"]
    assert "nvidia.com/gpu" not in head_spec["containers"][0]["resources"]["limits"]
    assert head_spec["terminationGracePeriodSeconds"] == 45 + k8s.SHUTDOWN_MARGIN_S
    assert cluster["authOptions"] == {"mode": "token"} and cluster["rayVersion"] == k8s.ray_version()
    assert shipped_recipe(configmap, tmp_path).model_dump() == recipe.model_dump()
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and pvc["metadata"]["name"] == "demo-run-1-shared"


def test_pods_share_claim_recipe_shm_and_secret_reference(tmp_path):
    recipe, _ = make_recipe(tmp_path, {"cluster": {"kubernetes": {"shm_size": "4Gi"}}})
    objects = render(recipe)
    for template in pod_templates(objects).values():
        spec = template["spec"]
        container = spec["containers"][0]
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert volumes["shared"]["persistentVolumeClaim"] == {"claimName": "demo-run-1-shared"}
        assert mounts[recipe.output_dir]["name"] == "shared"
        assert volumes["recipe"]["configMap"] == {"name": "demo-run-1-recipe"} and mounts["/etc/tunefleet"]["readOnly"]
        assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "4Gi"}
        assert mounts["/dev/shm"]["name"] == "dshm"
        wandb = [e for e in container["env"] if e["name"] == "WANDB_API_KEY"]
        reference = {"secretKeyRef": {"name": "wandb", "key": "WANDB_API_KEY"}}
        assert wandb == [{"name": "WANDB_API_KEY", "valueFrom": reference}]


def test_checkpoint_dir_outside_output_dir_is_on_the_claim(tmp_path):
    recipe, _ = make_recipe(tmp_path, {"checkpoint": {"dir": str(tmp_path / "elsewhere" / "ckpt")}})
    mounts = pod_templates(render(recipe))["worker"]["spec"]["containers"][0]["volumeMounts"]
    assert {"name": "shared", "mountPath": recipe.checkpoint_dir, "subPath": "checkpoint-dir"} in mounts


@pytest.mark.parametrize("extra", [
    {},
    {"parallelism": {"use_gpu": True, "num_nodes": 1}, "cluster": {"kubernetes": {
        "service_account": "trainer", "storage_class": "nfs-client", "shm_size": "16Gi", "head_cpus": 1.5,
        "node_selector": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                        {"key": "spot", "value": "true", "effect": "NoExecute", "toleration_seconds": 60}]}}},
])
def test_core_objects_pass_kubernetes_validate_strict(tmp_path, extra):
    for obj in as_core_objects(render(make_recipe(tmp_path, extra)[0])):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_kubernetes_validate_cli_on_dry_run_output(tmp_path):
    recipe, _ = make_recipe(tmp_path)
    objects = render(recipe)
    (tmp_path / "dry-run.yaml").write_text(k8s.to_yaml(recipe, objects))
    (tmp_path / "pods.yaml").write_text(yaml.safe_dump_all(as_core_objects(objects)[2:]))
    cli = Path(sys.executable).parent / "kubernetes-validate"
    result = subprocess.run([str(cli), "--strict", "-k", K8S_VERSION, "dry-run.yaml", "pods.yaml"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed for resource") == 6
    assert "Couldn't find schema for kind RayJob" in result.stdout  # covered by rayjob-v1.json below
    template = as_core_objects(objects)[2]
    template["template"]["spec"]["containers"][0]["gpus"] = 1  # not a Container field: strict must catch it
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(template, K8S_VERSION, strict=True)


def test_rayjob_matches_the_kuberay_v1_schema(tmp_path):
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    for extra in ({}, {"parallelism": {"use_gpu": True}, "fault_tolerance": {"max_restarts": 0}}):
        job = render(make_recipe(tmp_path, extra)[0])[2]
        jsonschema.validate(job, SCHEMA)
        worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
        assert worker["minReplicas"] <= worker["replicas"] <= worker["maxReplicas"]  # KubeRay's own check
    assert tuple(int(p) for p in k8s.ray_version().split(".")[:2]) >= (2, 52)  # authOptions needs Ray 2.52+


@pytest.mark.parametrize("path, value", [
    (("spec", "restartPolicy"), "Never"),  # a field RayJobSpec does not have
    (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "rayStartParams", "num-cpus"), 6),  # must be a string
    (("spec", "rayClusterSpec", "headGroupSpec", "replicas"), 1),
    (("spec", "submissionMode"), "K8sMode"),
    (("metadata", "name"), "x" * 48),
])
def test_schema_rejects_what_kuberay_rejects(tmp_path, path, value):
    job = render(make_recipe(tmp_path)[0])[2]
    node = job
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(job, SCHEMA)


def test_hostile_values_come_out_literal(tmp_path):
    hostile = 'a "b" \'c\' $(touch /tmp/pwned) `id` ${HOME} $$ $(WANDB_API_KEY)'
    output_dir = str(tmp_path / f"run {hostile}")
    extra = {
        "output_dir": output_dir,
        "data": {"sources": [{"path": f"data/x\n---\nkind: Secret\n# {hostile}.jsonl"}]},
        "logging": {"wandb": {"project": f"p\n{hostile}", "tags": [hostile]}},
        "cluster": {"kubernetes": {"node_selector": {"pool": hostile},
                                   "tolerations": [{"key": "k", "value": hostile}]}},
    }
    recipe, _ = make_recipe(tmp_path, extra)
    objects = render(recipe)
    text = k8s.to_yaml(recipe, objects)
    assert list(yaml.safe_load_all(text)) == objects  # nothing injected: the same three documents
    assert all(line.startswith("#") for line in text.split("apiVersion: v1\nkind: ConfigMap")[0].splitlines())
    assert shipped_recipe(objects[0], tmp_path).model_dump() == recipe.model_dump()
    assert objects[2]["spec"]["entrypoint"] == shlex.join(k8s.DRIVER_ARGV)
    for template in pod_templates(objects).values():
        spec, container = template["spec"], template["spec"]["containers"][0]
        assert spec["nodeSelector"] == {"pool": hostile} and spec["tolerations"][0]["value"] == hostile
        assert container["volumeMounts"][0]["mountPath"] == output_dir
        env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        # Kubernetes expands $(VAR) in env values; the WANDB_API_KEY reference must not leak into a path.
        expanded = k8s_expand(env["TUNEFLEET_CACHE"], {**env, "WANDB_API_KEY": WANDB_KEY})
        assert expanded == f"{output_dir}/.cache/tunefleet"
        command = " ".join(container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", []))
        assert "$(" not in command and "$$" not in command
    for obj in as_core_objects(objects):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    jsonschema.validate(objects[2], SCHEMA)


def test_image_required_and_flags_reach_the_pods(tmp_path):
    recipe, _ = make_recipe(tmp_path)
    with pytest.raises(ClusterError, match="--image"):
        k8s.manifests(recipe, recipe.cluster.kubernetes.model_copy(update={"image": None}))
    flagged = recipe.cluster.kubernetes.model_copy(update={"namespace": "team-a", "image": "other:2"})
    configmap, _, job = k8s.manifests(recipe, flagged)
    assert job["metadata"]["namespace"] == "team-a"
    assert shipped_recipe(configmap, tmp_path).cluster.kubernetes == flagged


def test_plugs_into_the_backend_registry(monkeypatch):
    import inspect

    from tunefleet.cluster import backend

    monkeypatch.setitem(backend.BACKENDS, "kubernetes", "tunefleet.cluster.kubernetes")
    assert backend.parse_job_ref("kubernetes:ml/demo") == ("kubernetes", "ml/demo")
    plugged = backend.get_backend("kubernetes")
    assert plugged.name == "kubernetes"
    for method in ("render", "submit", "status", "logs", "cancel"):
        expected = inspect.signature(getattr(backend.Backend, method)).parameters
        assert list(inspect.signature(getattr(plugged, method)).parameters) == list(expected)[1:]


# --------------------------------------------------------------------------- one recipe, three backends
def test_local_slurm_and_kubernetes_agree(tmp_path):
    from tunefleet.cluster.slurm import render_sbatch
    from tunefleet.launcher.run.session import worker_group

    recipe, path = make_recipe(tmp_path, {"parallelism": {"use_gpu": True}}, ["fault_tolerance.max_restarts=4"])
    par = recipe.parallelism
    local = worker_group(SimpleNamespace(recipe=recipe), None)
    scaling, failure = local.scaling_config, local.run_config.failure_config

    configmap, _, job = render(recipe)
    worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    pod = worker["template"]["spec"]["containers"][0]
    shipped = shipped_recipe(configmap, tmp_path)
    k8s_workers = worker["replicas"] * int(worker["rayStartParams"]["num-cpus"]) // par.cpus_per_worker
    k8s_gpus = worker["replicas"] * int(pod["resources"]["limits"]["nvidia.com/gpu"])
    shared = [m["mountPath"] for m in pod["volumeMounts"] if m["name"] == "shared"]

    options = SlurmConfig(bin_dir=str(Path(sys.executable).parent))
    script = render_sbatch(recipe, str(path), ["fault_tolerance.max_restarts=4"], options)
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)=?(\S*)$", script, re.MULTILINE))
    slurm_recipe_path = shlex.split(re.search(r"^RECIPE=(.*)$", script, re.MULTILINE).group(1))[0]
    launch_args = shlex.split(re.search(r"^LAUNCH_ARGS=\((.*)\)$", script, re.MULTILINE).group(1))
    slurm_recipe = load_recipe(slurm_recipe_path, launch_args[1::2])

    assert scaling.num_workers == k8s_workers == int(sbatch["nodes"]) * par.workers_per_node == 4
    assert scaling.resources_per_worker == {"CPU": 3}
    assert int(pod["resources"]["requests"]["cpu"]) == int(sbatch["cpus-per-task"]) == 3 * par.workers_per_node
    assert scaling.use_gpu and k8s_gpus == int(sbatch["nodes"]) * int(sbatch["gpus-per-node"]) == 4
    for other in (shipped, slurm_recipe):
        assert other.checkpoint_dir == recipe.checkpoint_dir and other.output_dir == recipe.output_dir
        assert other.fault_tolerance.max_restarts == failure.max_failures == 4
    assert job["spec"]["backoffLimit"] == 4 and "requeue" in sbatch
    for written in (recipe.checkpoint_dir, local.run_config.storage_path):
        assert any(Path(written).is_relative_to(mount) for mount in shared)
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert int(sbatch["signal"].split("@")[1]) >= recipe.fault_tolerance.preemption_grace_s
    assert head["terminationGracePeriodSeconds"] >= recipe.fault_tolerance.preemption_grace_s


# --------------------------------------------------------------------------- a fake API server
_ROUTE = re.compile(r"^/(?:api/v1|apis/ray\.io/v1)/namespaces/(?P<ns>[^/]+)/(?P<res>[a-z]+)"
                    r"(?:/(?P<name>[^/]+))?(?P<log>/log)?$")


class FakeKube:
    """Serves configmaps, persistentvolumeclaims, rayjobs, pods and pod logs; records every request."""

    def __init__(self):
        self.objects: dict[tuple[str, str, str], dict] = {}
        self.requests: list[SimpleNamespace] = []
        self.log_chunks: list[bytes] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _handle(self):
                url = urlsplit(self.path)
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                body = json.loads(raw) if raw.startswith(("{", "[")) else raw
                headers = {key.lower(): value for key, value in self.headers.items()}
                fake.requests.append(SimpleNamespace(method=self.command, path=url.path, query=parse_qs(url.query),
                                                     headers=headers, body=body))
                match = _ROUTE.match(url.path)
                if match is None:
                    return self._send(404, _status(404, f"no route {url.path}"))
                if match["log"]:
                    return self._stream_log()
                return self._send(*fake.answer(self.command, match["res"], match["ns"], match["name"], body,
                                               parse_qs(url.query)))

            do_GET = do_POST = do_PUT = do_DELETE = _handle

            def _send(self, code: int, payload: dict):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _stream_log(self):
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                for chunk in fake.log_chunks:
                    self.wfile.write(chunk)
                    self.wfile.flush()
                    time.sleep(0.05)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def put(self, res: str, ns: str, obj: dict) -> None:
        obj = json.loads(json.dumps(obj))  # the recorded request keeps what the client sent
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", ns)
        meta.setdefault("creationTimestamp", "2026-01-01T00:00:00Z")
        self.objects[(res, ns, meta["name"])] = obj

    def answer(self, method: str, res: str, ns: str, name: str | None, body, query: dict) -> tuple[int, dict]:
        key = (res, ns, name)
        if method == "GET" and name is None:
            wanted = dict(pair.split("=", 1) for pair in query.get("labelSelector", [""])[0].split(",") if pair)
            items = [o for (r, n, _), o in self.objects.items() if r == res and n == ns
                     and wanted.items() <= o["metadata"].get("labels", {}).items()]
            return 200, {"kind": "List", "apiVersion": "v1", "metadata": {}, "items": items}
        if method == "POST":
            if (res, ns, body["metadata"]["name"]) in self.objects:
                return 409, _status(409, f'{res} "{body["metadata"]["name"]}" already exists')
            self.put(res, ns, body)
            return 201, body
        if key not in self.objects:
            return 404, _status(404, f'{res} "{name}" not found')
        if method == "PUT":
            self.put(res, ns, body)
        elif method == "DELETE":
            del self.objects[key]
            return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success"}
        return 200, self.objects.get(key, body)

    def calls(self) -> list[tuple[str, str]]:
        return [(r.method, r.path) for r in self.requests]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _status(code: int, message: str) -> dict:
    reason = {404: "NotFound", 409: "AlreadyExists"}[code]
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason,
            "code": code}


def write_kubeconfig(path: Path, server: str) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": server}}],
        "users": [{"name": "fake", "user": {"token": "fake-bearer-token"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
    }))
    return path


@pytest.fixture
def kube_api(tmp_path, monkeypatch):
    fake = FakeKube()
    monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "kubeconfig", fake.url)))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", WANDB_KEY)
    yield fake
    fake.stop()


RAYJOBS = "/apis/ray.io/v1/namespaces/ml/rayjobs"
CORE = "/api/v1/namespaces/ml"


def test_submit_creates_configmap_claim_and_rayjob(kube_api, tmp_path):
    recipe, path = make_recipe(tmp_path)
    job_id = k8s.submit(recipe, str(path), [], recipe.cluster.kubernetes)
    assert job_id == "ml/demo-run-1"
    assert kube_api.calls() == [
        ("GET", f"{RAYJOBS}/demo-run-1"), ("POST", f"{CORE}/configmaps"),
        ("GET", f"{CORE}/persistentvolumeclaims/demo-run-1-shared"), ("POST", f"{CORE}/persistentvolumeclaims"),
        ("POST", RAYJOBS),
    ]
    posted = [r.body for r in kube_api.requests if r.method == "POST"]
    assert posted == render(recipe)
    assert all(r.headers.get("authorization") == "Bearer fake-bearer-token" for r in kube_api.requests)
    assert WANDB_KEY not in json.dumps([vars(r) for r in kube_api.requests])


def test_submit_reuses_claim_and_replaces_stale_configmap(kube_api, tmp_path):
    recipe, path = make_recipe(tmp_path)
    kube_api.put("configmaps", "ml", {"metadata": {"name": "demo-run-1-recipe"}, "data": {"recipe.yaml": "old"}})
    kube_api.put("persistentvolumeclaims", "ml", {"metadata": {"name": "demo-run-1-shared"}})
    k8s.submit(recipe, str(path), [], recipe.cluster.kubernetes)
    assert ("PUT", f"{CORE}/configmaps/demo-run-1-recipe") in kube_api.calls()
    assert ("POST", f"{CORE}/persistentvolumeclaims") not in kube_api.calls()
    assert kube_api.objects[("configmaps", "ml", "demo-run-1-recipe")]["data"] == render(recipe)[0]["data"]


def test_submit_refuses_a_live_job_of_the_same_name(kube_api, tmp_path):
    recipe, path = make_recipe(tmp_path)
    kube_api.put("rayjobs", "ml", {"metadata": {"name": "demo-run-1"}, "status": {"jobDeploymentStatus": "Running"}})
    with pytest.raises(ClusterError, match=r"is Running; `tunefleet cancel kubernetes:ml/demo-run-1`"):
        k8s.submit(recipe, str(path), [], recipe.cluster.kubernetes)
    assert kube_api.calls() == [("GET", f"{RAYJOBS}/demo-run-1")]


def test_submit_replaces_a_finished_job(kube_api, tmp_path):
    recipe, path = make_recipe(tmp_path)
    kube_api.put("rayjobs", "ml", {"metadata": {"name": "demo-run-1"}, "status": {"jobDeploymentStatus": "Failed"}})
    k8s.submit(recipe, str(path), [], recipe.cluster.kubernetes)
    assert kube_api.calls()[:3] == [("GET", f"{RAYJOBS}/demo-run-1"), ("DELETE", f"{RAYJOBS}/demo-run-1"),
                                    ("GET", f"{RAYJOBS}/demo-run-1")]
    assert kube_api.calls()[-1] == ("POST", RAYJOBS)
    assert kube_api.objects[("rayjobs", "ml", "demo-run-1")]["spec"] == render(recipe)[2]["spec"]


def test_status_reads_deployment_and_job_status(kube_api):
    kube_api.put("rayjobs", "ml", {"metadata": {"name": "demo"}, "status": {
        "jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "rayClusterName": "demo-raycluster-x1", "failed": 1}})
    backend = k8s
    status = backend.status("ml/demo")
    assert (status.job_id, status.state, status.nodes, status.restarts, status.finished) == (
        "kubernetes:ml/demo", "Running", "demo-raycluster-x1", 1, False)
    assert "Ray job RUNNING" in status.reason
    kube_api.objects[("rayjobs", "ml", "demo")]["status"].update(jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    assert backend.status("kubernetes:ml/demo").finished
    with pytest.raises(ClusterError, match="404"):
        backend.status("ml/missing")


def test_logs_stream_the_submitter_pod(kube_api):
    kube_api.put("rayjobs", "ml", {"metadata": {"name": "demo"}, "status": {"rayClusterName": "demo-rc"}})
    kube_api.put("pods", "ml", {"metadata": {"name": "demo-rc-head-0", "labels": {
        "ray.io/cluster": "demo-rc", "ray.io/node-type": "head"}}})
    kube_api.log_chunks = [b"step 1 loss 2.0\n", b"caf\xc3", b"\xa9 done\n"]
    assert "".join(k8s.logs("ml/demo", follow=False)) == "step 1 loss 2.0\ncafé done\n"
    assert kube_api.calls()[-1] == ("GET", f"{CORE}/pods/demo-rc-head-0/log")  # no submitter pod yet: the head
    kube_api.put("pods", "ml", {"metadata": {"name": "demo-abcde", "labels": {"job-name": "demo"}}})
    assert "".join(k8s.logs("ml/demo", follow=True)).endswith("café done\n")
    last = kube_api.requests[-1]
    assert (last.path, last.query.get("follow")) == (f"{CORE}/pods/demo-abcde/log", ["true"])


def test_cancel_deletes_a_live_rayjob_in_the_foreground(kube_api):
    kube_api.put("rayjobs", "ml", {"metadata": {"name": "demo"}, "status": {"jobDeploymentStatus": "Running"}})
    before = k8s.cancel("kubernetes:ml/demo")
    assert before.state == "Running" and ("rayjobs", "ml", "demo") not in kube_api.objects
    delete = kube_api.requests[-1]
    assert (delete.method, delete.path, delete.body["propagationPolicy"]) == ("DELETE", f"{RAYJOBS}/demo", "Foreground")
    kube_api.put("rayjobs", "ml", {"metadata": {"name": "done"}, "status": {"jobDeploymentStatus": "Complete"}})
    assert k8s.cancel("ml/done").finished
    assert kube_api.calls()[-1] == ("GET", f"{RAYJOBS}/done")  # a finished job is left as it is


def test_unreachable_api_and_missing_credentials_are_clear(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    with pytest.raises(ClusterError, match="no Kubernetes credentials"):
        k8s.status("ml/demo")
    fake = FakeKube()
    fake.stop()  # a port nobody listens on any more
    monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "kubeconfig", fake.url)))
    with pytest.raises(ClusterError, match="cannot reach the Kubernetes API"):
        k8s.status("ml/demo")


def test_job_ids(tmp_path):
    assert k8s.parse_job_id("kubernetes:ml/demo") == k8s.parse_job_id("ml/demo") == ("ml", "demo")
    for bad in ("demo", "ml/", "ml/a/b", "slurm:42"):
        with pytest.raises(ClusterError, match="namespace"):
            k8s.parse_job_id(bad)
    assert k8s.job_name(make_recipe(tmp_path, {"name": "7B_" + "x" * 60})[0]).startswith("tf-7b-")


def test_secrets_reach_the_pods_by_reference_only(tmp_path, monkeypatch):
    planted = {"HF_TOKEN": "hf-planted-7f3a9c", "WANDB_API_KEY": "wandb-planted-51be0d",
               "TUNEFLEET_DB_PASSWORD": "pw-9e1"}
    for name, value in planted.items():
        monkeypatch.setenv(name, value)
    recipe, _ = make_recipe(tmp_path, {"cluster": {"kubernetes": {
        "secret_env": [{"name": "HF_TOKEN", "secret": "hf", "key": "token"}], "env_from_secrets": ["service-creds"]}}})
    text = json.dumps(render(recipe))
    assert not [name for name, value in planted.items() if value in text]
    container = pod_templates(render(recipe))["worker"]["spec"]["containers"][0]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in container["env"]
    assert container["envFrom"] == [{"secretRef": {"name": "service-creds"}}]
    for obj in as_core_objects(render(recipe)):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
