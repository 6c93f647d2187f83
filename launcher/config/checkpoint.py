"""The `checkpoint` and `fault_tolerance` sections: what is saved, kept and exported, and how often a run
restarts after a failure."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tunefleet.launcher.config.base import LocalPath, Section

# `tunefleet export --max-shard-size` when not given: Hugging Face's own default for save_pretrained.
DEFAULT_MAX_SHARD_SIZE = "5GB"


class CheckpointConfig(Section):
    every_steps: int | None = Field(None, ge=1, description="Save a resumable checkpoint every N steps.")
    keep_last: int = Field(2, ge=1, description="How many complete checkpoints to keep.")
    dir: LocalPath | None = Field(
        None, description="Checkpoint folder (shared storage); default `<output_dir>/checkpoints`."
    )
    export_final: bool = Field(
        True, description="Save the trained model in Hugging Face format to `<output_dir>/final`."
    )
    keep_best: bool = Field(
        False, description="Also keep the checkpoint with the best `data.eval.metric`, never pruned (besides the "
        "last `keep_last`): an evaluation that sets a new best writes a checkpoint at its step. The best value "
        "and step are recorded in every checkpoint's meta.json, so a resume keeps them. Needs `data.eval` and "
        "`train.eval_every_steps`."
    )
    final_from: Literal["last", "best"] = Field(
        "last", description="Which weights `<output_dir>/final` holds: the last step's, or the best checkpoint's "
        "(needs `keep_best`)."
    )
    async_save: bool = Field(
        False, alias="async", description="Write checkpoints in the background (DCP strategies: ddp, fsdp); "
        "the step loop stalls only to stage a copy.",
    )


class FaultToleranceConfig(Section):
    max_restarts: int = Field(0, ge=0, description="Restart the worker group after a failure this many times.")
    preemption_grace_s: float = Field(
        120.0, gt=0, description="After SIGTERM/SIGUSR1, seconds allowed to write a checkpoint before exiting."
    )
