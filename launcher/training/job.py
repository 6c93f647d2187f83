"""What the driver hands every worker: the resolved recipe, plan and paths of one launch (``Job``), or of
one `tunefleet eval` (``EvalJob``). Kept apart from the training loop so that the driver can build one
without importing the loop and what it needs (checkpointing, strategies, models)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tunefleet.launcher.config import Recipe
from tunefleet.strategies.base import StrategyPlan

STARTUP_FILE = "startup.json"


@dataclass(frozen=True)
class Job:
    """What the driver resolved before workers start (shipped to every worker)."""

    recipe: Recipe
    strategy_plan: StrategyPlan
    model_path: str
    data_dir: str
    wandb_run_id: str
    launch_id: str = ""
    attachments: dict = field(default_factory=dict)  # e.g. the planner's report, for the W&B run
    driver_versions: dict = field(default_factory=dict)
    host_bytes_needed: int = 0


@dataclass(frozen=True)
class EvalJob(Job):
    """What the driver resolved for `tunefleet eval`: the run's recipe with the evaluated file as its data, and
    the exported model or adapter (``model_path`` stays the base: tokenizer, adapters, DPO's reference)."""

    model_dir: str = field(kw_only=True)
