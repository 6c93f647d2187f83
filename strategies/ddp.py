"""DDP: every rank holds the whole model; gradients are all-reduced (averaged)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from tunefleet.strategies import dcp_state
from tunefleet.strategies.activation_checkpointing import enable_activation_checkpointing
from tunefleet.strategies.base import (
    UNFREEZE_STEP,
    OptimizerFactory,
    SchedulerFactory,
    Strategy,
)
from tunefleet.strategies.dcp_state import AsyncSave
from tunefleet.strategies.layers import compile_layers


class DDPStrategy(AsyncSave, Strategy):
    name = "ddp"

    def setup(
        self,
        module: torch.nn.Module,
        make_optimizer: OptimizerFactory,
        make_scheduler: SchedulerFactory,
        param_groups: list[dict],
    ) -> None:
        if self.plan.activation_checkpointing:
            enable_activation_checkpointing(module)
        if self.plan.compile:
            compile_layers(module)
        device = self.plan.device
        module.to(device)
        if self.plan.mixed_precision == "bf16":
            # Master weights and optimizer stay fp32; matmuls run in bf16.
            module.forward = torch.autocast(device.type, dtype=torch.bfloat16)(module.forward)
        self.model = DistributedDataParallel(
            module,
            device_ids=[device.index] if device.type == "cuda" else None,
            # Parameters frozen at construction (PEFT's base) are left out of the reducer. Ones that
            # start frozen and train later (UNFREEZE_STEP) must be in it, and while frozen DDP must not
            # wait for their grads (it failed with "Expected to have finished reduction in the prior
            # iteration"); unused ones then keep grad None, so the optimizer skips them.
            find_unused_parameters=any(UNFREEZE_STEP in group for group in param_groups),
            gradient_as_bucket_view=True,
        )
        self.optimizer = make_optimizer(param_groups)
        self.scheduler = make_scheduler(self.optimizer)

    @contextlib.contextmanager
    def no_sync(self, enabled: bool) -> Iterator[None]:
        with self.model.no_sync() if enabled else contextlib.nullcontext():
            yield

    def optimizer_step(self) -> float | None:
        self.wait_staged()  # a background checkpoint must have copied the state first
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = None
        if self.plan.max_grad_norm is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.plan.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def save(self, path: str) -> None:
        dcp_state.save_dcp(path, self.model, self.optimizer, self.scheduler)

    def load(self, path: str) -> None:
        dcp_state.load_dcp(path, self.model, self.optimizer, self.scheduler)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        if dist.get_rank() != 0:
            return {}
        return {k: v.detach().cpu() for k, v in self.unwrapped.state_dict().items()}
