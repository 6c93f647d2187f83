"""The `train` section: optimizer, learning-rate schedule, steps and gradual unfreezing."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tunefleet.launcher.config.base import Section


class UnfreezeStep(Section):
    step: int = Field(ge=1, description="Optimizer step (counted from 0) at which `modules` first train.")
    modules: list[str] = Field(
        min_length=1, description="Module or parameter name patterns (fnmatch, e.g. `model.layers.0` or "
        "`model.layers.[0-1].*`); each must match a trainable parameter."
    )


class TrainConfig(Section):
    max_steps: int = Field(ge=1, description="Optimizer steps to run.")
    micro_batch_size: int = Field(1, ge=1, description="Rows per worker per forward pass.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    lr: float = Field(2e-5, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not applied to biases and norms).")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    optimizer_impl: Literal["auto", "fused", "foreach"] = Field(
        "auto", description="AdamW implementation: `fused` (one kernel for all parameters; the fastest on GPUs), "
        "`foreach` (batched per-op kernels), or `auto`: fused when the parameters are on a GPU, foreach on CPUs. "
        "Both compute the same update up to rounding."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    schedule: Literal["constant", "linear", "cosine"] = Field(
        "cosine", description="Learning-rate decay after warm-up."
    )
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Floor of the decay as a fraction of `lr`.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm; null disables.")
    seed: int = Field(0, description="Seeds model init, data order and dropout.")
    eval_every_steps: int | None = Field(None, ge=1, description="Evaluate every N steps (and at start and end).")
    lr_layer_decay: float | None = Field(
        None, gt=0, le=1, description="Layer-wise rate decay: the top decoder/encoder layer trains at `lr`, a "
        "layer n below it at lr x decay^n, the embeddings lowest (one step below the bottom layer); the final "
        "norm and heads at `lr`. Null: one rate."
    )
    head_lr: float | None = Field(
        None, gt=0, description="Peak rate of newly initialised weights (those the model folder lacks, e.g. a "
        "sequence-classification `score`/`classifier` head); the warm-up and decay apply to it too."
    )
    unfreeze_schedule: list[UnfreezeStep] = Field(
        default_factory=list, description="Gradual unfreezing: these modules start frozen and become trainable "
        "at the given step, e.g. `[{step: 100, modules: [\"model.layers.[2-3].*\"]}]`."
    )

    @property
    def rows_per_worker_step(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps

    @model_validator(mode="after")
    def _warmup(self) -> TrainConfig:
        if self.warmup_steps > self.max_steps:
            raise ValueError(
                f"train.warmup_steps ({self.warmup_steps}) exceeds train.max_steps ({self.max_steps}); lower it"
            )
        return self

    @model_validator(mode="after")
    def _unfreeze_steps(self) -> TrainConfig:
        for i, entry in enumerate(self.unfreeze_schedule):
            if entry.step >= self.max_steps:
                raise ValueError(f"train.unfreeze_schedule.{i}.step: {entry.step} is not below train.max_steps "
                                 f"({self.max_steps}), so those modules would never train; lower it")
        return self
