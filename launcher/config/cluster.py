"""The `cluster` section: the Ray cluster to join, and the resources of `tunefleet submit` to Kubernetes
(a KubeRay RayJob) or Slurm (an sbatch job)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field

from tunefleet.launcher.config.base import LocalPath, Section

_K8S_NAME = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"  # DNS subdomain: Secrets, PVCs, service accounts
_K8S_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"  # DNS label: namespaces
_QUANTITY = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"


class Toleration(Section):
    key: str | None = Field(None, description="Taint key; none with `operator: Exists` tolerates every taint.")
    operator: Literal["Exists", "Equal"] = Field("Equal", description="`Equal` matches `value`; `Exists` any value.")
    value: str | None = Field(None, description="Taint value to match with `operator: Equal`.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to tolerate; none tolerates every effect."
    )
    toleration_seconds: int | None = Field(
        None, ge=0, description="With `effect: NoExecute`: seconds a pod stays on a node after the taint appears."
    )


class SecretEnv(Section):
    """One environment variable of the pods, taken from a key of an existing Kubernetes Secret."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Variable name in the pods, e.g. `HF_TOKEN`.")
    secret: str = Field(max_length=253, pattern=_K8S_NAME, description="Name of the Secret (in the job's namespace).")
    key: str = Field(pattern=r"^[-._a-zA-Z0-9]+$", description="Key inside the Secret whose value the variable gets.")


class KubernetesConfig(Section):
    """`tunefleet submit --to kubernetes`: a KubeRay `RayJob` (ray.io/v1 API of KubeRay v1.5.1 or newer)."""

    namespace: str = Field(
        "default", max_length=63, pattern=_K8S_LABEL, description="Namespace of the RayJob, its pods, "
        "ConfigMap and claim; `--namespace` overrides."
    )
    image: str | None = Field(
        None, description="Container image of the head and worker pods: tunefleet installed, with the Ray "
        "version of the submitting machine and the model and data files the recipe names; `--image` overrides."
    )
    service_account: str | None = Field(
        None, max_length=253, pattern=_K8S_NAME, description="ServiceAccount the pods run as; default the namespace's."
    )
    pvc_name: str | None = Field(
        None, max_length=253, pattern=_K8S_NAME, description="PersistentVolumeClaim shared by every pod, mounted at "
        "`output_dir` (checkpoints, metrics, prepared data); created if missing, reused if present so a resubmit "
        "resumes; default `<run name>-shared`."
    )
    pvc_size: str = Field("100Gi", pattern=_QUANTITY, description="Storage requested when the claim is created.")
    storage_class: str | None = Field(
        None, max_length=253, pattern=_K8S_NAME, description="StorageClass of a new claim; it must offer "
        "ReadWriteMany (NFS, CephFS, a cloud file store); default the cluster's default class."
    )
    memory_per_worker: str = Field(
        "16Gi", pattern=_QUANTITY, description="Memory per training worker; a worker pod requests and is limited "
        "to `parallelism.workers_per_node` times this. CPUs per worker come from `parallelism.cpus_per_worker` "
        "and, with `parallelism.use_gpu`, one `nvidia.com/gpu` per worker."
    )
    head_cpus: float = Field(
        2, gt=0, description="CPU cores of the head pod, which runs the driver, data preparation and the "
        "launch's hub actor and never a training worker."
    )
    head_memory: str = Field("8Gi", pattern=_QUANTITY, description="Memory of the head pod (request and limit).")
    shm_size: str | None = Field(
        None, pattern=_QUANTITY, description="Size limit of each pod's memory-backed `/dev/shm` (it counts "
        "against the pod's memory); default no limit of its own."
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the head and worker pods must run on, e.g. "
        "`{nvidia.com/gpu.product: NVIDIA-A100-SXM4-80GB}`."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, description="Taints the head and worker pods tolerate (e.g. of GPU node pools)."
    )
    wandb_secret: str | None = Field(
        None, max_length=253, pattern=_K8S_NAME, description="Secret holding the W&B API key; pods get it as "
        "`WANDB_API_KEY` by reference, so the key never appears in a manifest. None: W&B runs offline."
    )
    wandb_secret_key: str = Field(
        "WANDB_API_KEY", pattern=r"^[-._a-zA-Z0-9]+$", description="Key of the API key inside `wandb_secret`."
    )
    secret_env: list[SecretEnv] = Field(
        default_factory=list, description="Environment variables the pods take from existing Secrets by reference "
        "(`secretKeyRef`), e.g. `[{name: HF_TOKEN, secret: hf, key: token}]` for a gated model; the manifest names "
        "the Secret, never a value."
    )
    env_from_secrets: list[Annotated[str, Field(max_length=253, pattern=_K8S_NAME)]] = Field(
        default_factory=list, description="Existing Secrets whose every key becomes an environment variable of the "
        "pods (`envFrom`), by reference."
    )
    keep_finished_s: int = Field(
        300, ge=0, description="Seconds the Ray cluster stays up after the job ends, before KubeRay deletes it."
    )


def _one_line(value: str) -> str:
    if not value or re.search(r"[\x00-\x1f\x7f]", value):
        raise ValueError("must be one non-empty line without control characters (it becomes an #SBATCH line)")
    return value


def _env_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        raise ValueError("not an environment variable name (letters, digits, _); list names here, never values")
    return value


SbatchText = Annotated[str, AfterValidator(_one_line)]
EnvName = Annotated[str, AfterValidator(_env_name)]


def _quoted_time(value: Any) -> Any:
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise ValueError(
            f"got the number {value}: quote the time limit, e.g. time: \"1:00:00\" "
            "(YAML reads an unquoted 1:00:00 as a count of seconds)"
        )
    return value


class SlurmConfig(Section):
    """`tunefleet submit --to slurm`: one sbatch job that starts Ray on its nodes and runs the recipe."""

    partition: SbatchText | None = Field(None, description="Partition (`--partition`); `--partition` overrides.")
    time: Annotated[SbatchText, BeforeValidator(_quoted_time)] | None = Field(
        None, description="Time limit (`--time`), e.g. \"2:00:00\" or \"1-12:00:00\" (quote it in YAML); "
        "`--time` overrides."
    )
    account: SbatchText | None = Field(None, description="Account to charge (`--account`); `--account` overrides.")
    cpus_per_node: int | None = Field(
        None, ge=1, description="CPUs per node (`--cpus-per-task`, one task per node); "
        "default parallelism.workers_per_node x parallelism.cpus_per_worker."
    )
    gpus_per_node: int | None = Field(
        None, ge=0, description="GPUs per node (`--gpus-per-node`); default parallelism.workers_per_node "
        "with parallelism.use_gpu, else none."
    )
    requeue: bool = Field(
        True, description="`--requeue`, and requeue the job after a checkpoint-and-stop (exit 75) so that it "
        "resumes by itself; false leaves resubmitting to you."
    )
    signal_grace_s: int | None = Field(
        None, ge=1, description="Seconds before the time limit at which Slurm sends USR1 "
        "(`--signal=B:USR1@N`): the run checkpoints, stops and is requeued; "
        "default fault_tolerance.preemption_grace_s + 30."
    )
    join_timeout_s: int = Field(300, ge=10, description="Seconds the job waits for every node's Ray to join.")
    export_env: list[EnvName] = Field(
        default_factory=lambda: ["WANDB_API_KEY", "HF_TOKEN"],
        description="Names (never values) of environment variables passed from the submitting shell to the "
        "job with `--export`, e.g. secrets such as WANDB_API_KEY; the script never holds their values."
    )
    export_all: bool = Field(
        True, description="Also pass the rest of the submitting environment (sbatch's default); "
        "false passes only `export_env` and Slurm's own variables."
    )
    bin_dir: LocalPath | None = Field(
        None, description="Folder holding the `tunefleet`, `ray` and `python` executables on the compute "
        "nodes; default this installation's (on a filesystem the nodes share)."
    )
    setup: list[str] = Field(
        default_factory=list, description="Shell lines the job runs before Ray starts, e.g. `module load cuda`; "
        "`srun` steps inherit the environment they set. Written into the script as code, not quoted."
    )
    extra_sbatch: list[SbatchText] = Field(
        default_factory=list, description="More sbatch options, one per item, e.g. `--qos=high` or "
        "`--constraint=a100`; each becomes an `#SBATCH` line."
    )


class ClusterConfig(Section):
    address: str | None = Field(
        None, description="Ray cluster address to join (`auto`, `ray://host:port`, `host:port`); "
        "default `RAY_ADDRESS` or an embedded local Ray."
    )
    dashboard: bool = Field(
        False, description="Start the Ray dashboard (http://127.0.0.1:8265) with the embedded local Ray. Off, Ray "
        "starts about 2 s sooner and its head modules leave the CPU to the ranks; a cluster joined by `address` keeps "
        "its own setting."
    )
    kubernetes: KubernetesConfig | None = Field(
        None, description="Pods, storage and secrets for `tunefleet submit --to kubernetes`; unused elsewhere."
    )
    slurm: SlurmConfig | None = Field(
        None, description="Resources, queue and job script for `tunefleet submit --to slurm`; unused elsewhere."
    )
