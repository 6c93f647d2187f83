"""The `parallelism` section: nodes, workers, the data-parallel strategy and its numerics."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tunefleet.launcher.config.base import Section

StrategyName = Literal["auto", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"]


class ParallelismConfig(Section):
    strategy: StrategyName = Field("ddp", description="Data-parallel strategy, or `auto` to let the planner pick.")
    num_nodes: int = Field(1, ge=1, description="Machines to use.")
    workers_per_node: int = Field(1, ge=1, description="Training processes per machine (one per GPU on GPU).")
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL backend; false trains on CPU over gloo.")
    cpus_per_worker: int = Field(1, ge=1, description="CPU cores Ray reserves for each worker.")
    min_workers: int | None = Field(
        None, ge=1, description="Keep training on at least this many workers after losing nodes "
        "(accumulation grows to keep the global batch); default: wait for the full count.",
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="Compute dtype for forward/backward.")
    activation_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    compile: bool = Field(
        False, description="torch.compile each decoder layer (ddp, fsdp): fuses norms, rotary embeddings and "
        "activations into fewer kernels, faster per step after a one-off compilation of some seconds to a minute "
        "on the first step (the layers share one compiled graph)."
    )
    cpu_offload: bool = Field(False, description="Keep parameters and optimizer state in host memory (fsdp, ZeRO).")
    collective_timeout_s: int = Field(600, ge=10, description="Seconds before a stuck collective fails the run.")

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.workers_per_node

    @model_validator(mode="after")
    def _min_workers(self) -> ParallelismConfig:
        if self.min_workers is not None and self.min_workers > self.world_size:
            raise ValueError(
                f"parallelism.min_workers ({self.min_workers}) exceeds num_nodes x workers_per_node "
                f"({self.world_size}); lower it"
            )
        return self
