"""The function Ray Train runs on every worker: quiet the libraries, build the
rank's reporter, and hand over to the training loop."""

from __future__ import annotations

import logging
import os
import socket

import ray
import ray.train

from tunefleet.launcher.training import failures, secrets
from tunefleet.launcher.training.loop import Job, run
from tunefleet.launcher.training.metrics import Reporter


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("torch.distributed").setLevel(logging.ERROR)


def train_loop_per_worker(config: dict) -> None:
    secrets.install(config.get("secrets"))
    _quiet_libraries()
    job: Job = config["job"]
    rank = ray.train.get_context().get_world_rank()
    reporter = Reporter(enabled=rank == 0, output_dir=job.recipe.output_dir, queue=config.get("queue"))
    node_id = ray.get_runtime_context().get_node_id()
    failures.watch(job.recipe.output_dir, rank, node_ip=ray.util.get_node_ip_address(), node_id=node_id)
    node = f"{socket.gethostname()}/{node_id[:8]}"
    result = run(job, reporter, control=config.get("control"), node=node)
    reporter.finish(result)
