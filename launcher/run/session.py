"""Ray session plumbing that `tunefleet launch` and `tunefleet eval` share: which cluster to join, joining
it, the workers' environment and secrets, the Ray Train worker group, and running it in the background."""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
from pathlib import Path

from tunefleet.launcher.collectives import process_group_backend
from tunefleet.launcher.config import Recipe
from tunefleet.launcher.training import secrets
from tunefleet.launcher.training.job import Job
from tunefleet.strategies.compat import deepspeed_env

# An embedded Ray without a dashboard: nothing reads its metrics, task events or event-loop statistics, no
# idle workers need prestarting for later tasks, and one machine is never preempted. Each of these costs every
# Ray process a timer; together they took 0.03 of the 0.14 core Ray used beside two CPU ranks (+3% tokens/s in
# alternating pairs of tiny:llama-20m launches). A user's own setting of any of them wins.
QUIET_EMBEDDED_RAY = {
    "RAY_enable_metrics_collection": "0", "RAY_task_events_report_interval_ms": "0", "RAY_event_stats": "0",
    "RAY_prestart_worker_first_driver": "0", "RAY_enable_worker_prestart": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_METRICS_ENABLED": "0",
}
FORWARDED_ENV = ("TUNEFLEET_", "WANDB_", "HF_", "TRANSFORMERS_", "TORCH_EXTENSIONS_DIR", "RAY_TRAIN_", "DS_")


def cluster_address(recipe: Recipe, address: str | None = None) -> str | None:
    """The Ray cluster to join: ``--address``, then ``cluster.address``, then ``RAY_ADDRESS``; None: an embedded
    local Ray."""
    return address or recipe.cluster.address or os.environ.get("RAY_ADDRESS")


def forwarded() -> tuple[dict[str, str], dict[str, str]]:
    """(settings, secrets) of the driver's environment that workers get: tunefleet's, W&B's, Hugging Face's,
    Ray Train's and DeepSpeed's variables, and the known secret names."""
    return secrets.split({k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV) or k in secrets.NAMES})


def worker_env(recipe: Recipe) -> dict[str, str]:
    """Settings for the workers' runtime env, which Ray logs: never a secret (see secrets.py)."""
    env, _ = forwarded()
    env.setdefault("OMP_NUM_THREADS", str(recipe.parallelism.cpus_per_worker))
    for name, value in deepspeed_env(recipe.parallelism.use_gpu).items():
        env.setdefault(name, value)
    return env


def quiet_ray_env(recipe: Recipe, environ) -> dict[str, str]:
    """The QUIET_EMBEDDED_RAY settings an embedded Ray gets: none with the dashboard on, none the user set."""
    if recipe.cluster.dashboard:
        return {}
    return {name: value for name, value in QUIET_EMBEDDED_RAY.items() if name not in environ}


def connect(recipe: Recipe, address: str | None) -> str | None:
    """Join the cluster at ``address`` or start the embedded local Ray; the Ray dashboard's URL, if it has one."""
    import ray

    # Ray Train's modules take 1-2 s to import (pandas, pyarrow, torch); ray.init mostly waits for Ray's
    # daemons to start, so they load meanwhile (time to first step -0.8 s, median of 3 alternating pairs).
    preload_in_background("ray.train.torch")
    if address:
        context = ray.init(address=address, logging_level="WARNING", log_to_driver=True)
        return dashboard_url(context)
    needed = recipe.parallelism.world_size * recipe.parallelism.cpus_per_worker
    # Ray starts worker processes at nice 15 to keep its daemons responsive; training ranks would then yield
    # the CPU to every other process on the node. Ray's own job submission sets 0 for its jobs, as here.
    os.environ.setdefault("RAY_worker_niceness", "0")
    # Without the dashboard (cluster.dashboard) ray.init takes 2.5 s instead of 3.5-4.8 s here (2 cores), and its
    # nine head modules do not compete with the ranks (docs/benchmarks.md).
    os.environ.update(quiet_ray_env(recipe, os.environ))
    context = ray.init(num_cpus=max(os.cpu_count() or 1, needed), logging_level="WARNING",
                       include_dashboard=recipe.cluster.dashboard)
    return dashboard_url(context)


def preload_in_background(module: str) -> threading.Thread:
    """Import ``module`` on a daemon thread, so that a later import finds it done. An import that fails here
    fails again, with its error, where the module is used."""
    def load() -> None:
        with contextlib.suppress(Exception):
            importlib.import_module(module)

    thread = threading.Thread(target=load, name=f"tunefleet-import-{module}", daemon=True)
    thread.start()
    return thread


def shutdown(*, embedded: bool, grace_s: float = 5.0) -> list[int]:
    """``ray.shutdown()``; for the embedded Ray, also end its worker processes that outlive it. Returns the pids
    that had to be killed.

    Ray ends the daemons it started (GCS, raylet) and each worker process exits on its own once its raylet is
    gone. Not always: Ray 2.60's core worker can deadlock in its own exit handler (a pubsub publisher destroyed
    while the event loop shuts down takes the loop's lock again; gdb of the stuck process), and Ray Train's
    controller then stays, orphaned, holding ~390 MB (7 such processes after a day of launches here). The
    embedded Ray's workers are this process's raylet's descendants, so they are known before the shutdown; any
    still alive ``grace_s`` after it is killed. A joined cluster's workers are not this launch's to end."""
    import psutil
    import ray

    workers = []
    if embedded:
        raylets = [child for child in psutil.Process().children() if _name(child) == "raylet"]
        workers = [worker for raylet in raylets for worker in _descendants(raylet)]
    ray.shutdown()
    _, alive = psutil.wait_procs(workers, timeout=grace_s)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    return [process.pid for process in alive]


def _name(process) -> str:
    import psutil

    try:
        return process.name()
    except psutil.Error:
        return ""


def _descendants(process) -> list:
    import psutil

    try:
        return process.children(recursive=True)
    except psutil.Error:
        return []


def dashboard_url(context) -> str | None:
    url = getattr(context, "dashboard_url", None)
    return (url if "://" in url else f"http://{url}") if url else None


def secret_store():
    """With Ray up: the actor that hands the forwarded secrets to the workers (None without secrets)."""
    return secrets.store(forwarded()[1], scheduling_strategy=head_node_affinity())


def hub():
    """With Ray up: the launch's hub actor (training/control.py), on the head node."""
    from tunefleet.launcher.training.control import HubActor

    return HubActor.options(scheduling_strategy=head_node_affinity()).remote()


def worker_group(job: Job, hub, *, loop=None, name: str | None = None, storage_path: str | None = None,
             secret_store=None, state_api: bool = True, autoscaler: bool = True):
    """The recipe's Ray Train worker group running ``loop`` (default: training) with ``job``, reporting to ``hub``
    (training/control.py). ``state_api``: whether the cluster serves Ray's State API (it has a dashboard);
    ``autoscaler``: whether it may have a cluster autoscaler (a joined cluster); see `trainer.trainer_class`."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from tunefleet.launcher.run.controller import FailureReporter
    from tunefleet.launcher.run.trainer import trainer_class
    from tunefleet.launcher.training.worker import pack_job, train_loop_per_worker

    recipe, par = job.recipe, job.recipe.parallelism
    return trainer_class(state_api=state_api, autoscaler=autoscaler)(
        loop or train_loop_per_worker,
        train_loop_config={"job": pack_job(job), "hub": hub, "secrets": secret_store},
        torch_config=TorchConfig(backend=process_group_backend(par.use_gpu), timeout_s=par.collective_timeout_s),
        scaling_config=ScalingConfig(
            num_workers=(par.min_workers, par.world_size) if par.min_workers else par.world_size,
            use_gpu=par.use_gpu, resources_per_worker={"CPU": par.cpus_per_worker},
            placement_strategy="STRICT_SPREAD" if par.num_nodes > 1 and par.workers_per_node == 1 else "PACK",
        ),
        run_config=RunConfig(
            name=name or recipe.name, storage_path=storage_path or str(Path(recipe.output_dir) / "ray"),
            failure_config=FailureConfig(max_failures=recipe.fault_tolerance.max_restarts),
            callbacks=[FailureReporter(hub, recipe.output_dir)],
            worker_runtime_env={"env_vars": worker_env(recipe)},
        ),
    )


def head_node_affinity():
    """Driver-side actors live on the head node, the one node a run cannot lose."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    head = next(n for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"])
    return NodeAffinitySchedulingStrategy(node_id=head["NodeID"], soft=False)


def fit_in_background(trainer) -> tuple[threading.Thread, list[BaseException]]:
    """Start ``trainer.fit()`` on a thread (the caller keeps reading the workers' events); the list receives
    the exception it ends with, if any."""
    failure: list[BaseException] = []
    thread = threading.Thread(target=_run_fit, args=(trainer, failure), daemon=True)
    thread.start()
    return thread, failure


def _run_fit(trainer, failure: list[BaseException]) -> None:
    try:
        trainer.fit()
    except BaseException as exc:  # re-raised on the main thread
        failure.append(exc)
