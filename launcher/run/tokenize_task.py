"""The driver's tokenization: ``preprocess.prepare`` as one Ray task on the driver's node, so that bad rows and
an empty data set fail the launch before any worker starts, and the cache is written once."""

from __future__ import annotations

from pathlib import Path

from tunefleet.launcher.config import DataConfig
from tunefleet.launcher.data import preprocess
from tunefleet.launcher.errors import UserError
from tunefleet.launcher.model.modeling import load_tokenizer


def _prepare(cfg: DataConfig, tokenizer_dir: str, seed: int) -> str:
    return str(preprocess.prepare(cfg, load_tokenizer(tokenizer_dir), tokenizer_dir, seed))


def prepare_on_ray(cfg: DataConfig, tokenizer_dir: str, seed: int) -> Path:
    """``prepare`` as one Ray task on this node (after ``ray.init``), skipped when the cache exists.

    Reserves ``data.num_proc`` CPUs; user errors (bad rows, an empty data set)
    are raised here, on the driver, before any worker starts.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    target = preprocess.cache_folder(cfg, tokenizer_dir, seed)
    if (target / "meta.json").is_file():
        return target
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    num_cpus = min(cfg.num_proc, ray.cluster_resources().get("CPU", 1))  # more would never schedule
    task = ray.remote(_prepare).options(num_cpus=num_cpus, scheduling_strategy=here, max_retries=0)
    try:
        return Path(ray.get(task.remote(cfg, tokenizer_dir, seed)))
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, UserError):
            raise exc.cause from None
        raise
