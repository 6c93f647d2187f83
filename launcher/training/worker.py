"""The functions Ray Train runs on every worker: quiet the libraries, then hand over to the training loop
(`tunefleet launch`), or to one evaluation with the loop's setup (`tunefleet eval`). Rank 0 sends the result
to the driver.

Ray Train's controller unpickles these functions and their config before any worker exists, on the one
critical path of a launch. So this module imports nothing heavy at its top, and the job travels as bytes
(`pack_job`) that only the workers open: unpickling a `Job` imports the loop, torch and transformers, which
cost the controller 3 s of CPU before it started a single worker (py-spy of a 2-worker CPU launch).
"""

from __future__ import annotations

import logging
import os
import socket

import ray
import ray.cloudpickle
import ray.train

from tunefleet.launcher.training import failures, secrets
from tunefleet.launcher.training.metrics import Reporter


def pack_job(job) -> bytes:
    """Driver: the job (a `job.Job` or `job.EvalJob`) as bytes for ``train_loop_config``."""
    return ray.cloudpickle.dumps(job)


def unpack_job(blob: bytes):
    """Worker: the job `pack_job` packed; imports what it holds (the recipe, the strategy plan)."""
    return ray.cloudpickle.loads(blob)


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("torch.distributed").setLevel(logging.ERROR)


def train_loop_per_worker(config: dict) -> None:
    from tunefleet.launcher.training.loop import TrainLoop

    secrets.install(config.get("secrets"))
    quiet_libraries()
    job = unpack_job(config["job"])
    rank = ray.train.get_context().get_world_rank()
    reporter = Reporter(enabled=rank == 0, output_dir=job.recipe.output_dir, hub=config.get("hub"))
    node_id = ray.get_runtime_context().get_node_id()
    failures.watch(job.recipe.output_dir, rank, node_ip=ray.util.get_node_ip_address(), node_id=node_id)
    node = f"{socket.gethostname()}/{node_id[:8]}"
    outcome = TrainLoop(job, reporter, hub=config.get("hub"), node=node).run()
    reporter.finish(outcome)


def eval_loop_per_worker(config: dict) -> None:
    """`tunefleet eval`: evaluate the exported model once (``config["job"]``, a packed EvalJob); rank 0 sends
    the figures back."""
    from tunefleet.launcher.training.loop import evaluate_exported

    secrets.install(config.get("secrets"))
    quiet_libraries()
    row = evaluate_exported(unpack_job(config["job"]))
    if ray.train.get_context().get_world_rank() == 0:
        ray.get(config["hub"].put.remote({"event": "finish", "metrics": row}))
