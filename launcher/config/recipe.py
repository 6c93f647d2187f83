"""The recipe: one YAML file that says what to fine-tune, on what, and how.

Every section is a pydantic model with ``extra="forbid"`` and a description on every field, in the module
of its section; the descriptions feed ``--help``, ``tunefleet schema`` and the docs. ``Recipe`` is the root,
with the checks that span sections; ``loading`` reads it from YAML.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml
from pydantic import Field, model_validator

from tunefleet.launcher.config.base import LocalPath, Section
from tunefleet.launcher.config.checkpoint import CheckpointConfig, FaultToleranceConfig
from tunefleet.launcher.config.cluster import ClusterConfig
from tunefleet.launcher.config.data import DataConfig
from tunefleet.launcher.config.logging import LoggingConfig
from tunefleet.launcher.config.method import PROMPT_LEARNING, MethodConfig
from tunefleet.launcher.config.model import ModelConfig
from tunefleet.launcher.config.parallelism import ParallelismConfig
from tunefleet.launcher.config.train import TrainConfig


class Recipe(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][\w.-]*$", description="Run name: letters, digits, `-`, `_`, `.`.")
    output_dir: LocalPath = Field(description="Run folder: resolved recipe, metrics, checkpoints, final model.")
    model: ModelConfig = Field(description="What to fine-tune.")
    method: MethodConfig = Field(default_factory=MethodConfig, description="Full fine-tuning or adapters.")
    data: DataConfig = Field(description="Training and evaluation data.")
    train: TrainConfig = Field(description="Optimization.")
    parallelism: ParallelismConfig = Field(default_factory=ParallelismConfig, description="Workers and strategy.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpoints and export.")
    fault_tolerance: FaultToleranceConfig = Field(
        default_factory=FaultToleranceConfig, description="Restarts after failures."
    )
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Metrics, console and W&B.")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="Where the Ray cluster is.")

    @model_validator(mode="after")
    def _elastic_batches(self) -> Recipe:
        par, train = self.parallelism, self.train
        global_rows = train.micro_batch_size * train.grad_accum_steps * par.world_size
        for workers in range(par.min_workers or par.world_size, par.world_size):
            if global_rows % (workers * train.micro_batch_size):
                raise ValueError(
                    f"parallelism.min_workers: on {workers} workers the global batch of {global_rows} rows "
                    f"does not split into micro-batches of {train.micro_batch_size}; raise min_workers or "
                    "change train.micro_batch_size"
                )
        return self

    @model_validator(mode="after")
    def _cross_checks(self) -> Recipe:
        if self.parallelism.use_gpu is False and self.parallelism.mixed_precision == "fp16":
            raise ValueError("parallelism.mixed_precision: fp16 needs GPUs; use bf16 or no on CPU")
        problems = self.data.objective_problems(
            task=self.model.task, objective=self.method.objective, num_labels=self.model.num_labels
        )
        if self.method.kind in PROMPT_LEARNING and self.data.packing:
            # peft's prompt tuning drops `position_ids` (and prefix tuning shifts them), which packed rows need
            # to keep documents apart.
            problems.append(f"data.packing: method.kind {self.method.kind} ignores the position ids packing "
                            "relies on; set data.packing: false")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _best_tracking(self) -> Recipe:
        """keep_best and early stopping follow evaluations, so they need some; final_from best needs keep_best."""
        ckpt, evaluation = self.checkpoint, self.data.eval
        wanted = [key for key, used in (("checkpoint.keep_best", ckpt.keep_best),
                                        ("data.eval.early_stopping_patience",
                                         evaluation is not None and evaluation.early_stopping_patience))
                  if used]
        problems = []
        for key in wanted:
            if evaluation is None or not evaluation.has_rows:
                problems.append(f"{key}: follows data.eval.metric, which needs held-out rows; set data.eval.path "
                                "or data.eval.fraction")
            elif self.train.eval_every_steps is None:
                problems.append(f"{key}: follows evaluations during training; set train.eval_every_steps")
        if ckpt.final_from == "best" and not ckpt.keep_best:
            problems.append("checkpoint.final_from: best needs checkpoint.keep_best: true")
        elif ckpt.final_from == "best" and not ckpt.export_final:
            problems.append("checkpoint.final_from: best has no effect with checkpoint.export_final: false; "
                            "remove it or export")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or str(Path(self.output_dir) / "checkpoints")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def fingerprint(self) -> str:
        """Hash of the resolved recipe: tells a resume whether the recipe changed."""
        return hashlib.sha256(self.to_yaml().encode()).hexdigest()[:16]
