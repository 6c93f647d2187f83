"""One optimizer step over a rank's micro-batches, whatever the objective.

Every objective normalizes its loss over the *global* batch (all ranks, all
micro-batches): target tokens for next-token and classifier losses, pairs for
reward modelling and DPO. Each micro-batch contributes its loss *sum* scaled by
``world_size / global_count``, so after the strategy averages gradients over
ranks the result is exactly the gradient of the global mean, however the batch
is split into ranks and micro-batches. Gradients are synchronized on the last
micro-batch only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tunefleet.launcher.model.inputs import on_device
from tunefleet.strategies.base import Strategy

Batch = dict[str, torch.Tensor]
# (differentiable loss sum, float64 statistics to sum alongside it, or None) of one micro-batch under the model.
MicroLoss = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass(frozen=True)
class StepResult:
    loss: float
    num_tokens: int  # target tokens in the global batch
    num_input_tokens: int  # non-pad input tokens in the global batch
    grad_norm: float | None

    def metrics(self) -> dict[str, float]:
        """Objective-specific metrics beyond the loss (none for next-token and classifier losses)."""
        return {}


def accumulate(strategy: Strategy, micro_batches: list[Batch], device: torch.device, micro_loss: MicroLoss, *,
               global_count: float) -> tuple[torch.Tensor, float | None]:
    """Forward/backward every micro-batch of this rank, each loss sum scaled by ``world_size / global_count``,
    then one optimizer step. Returns (this rank's float64 sums of ``[loss, *statistics]``, the gradient norm)."""
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    scale = world_size / max(global_count, 1)
    totals = torch.zeros((), dtype=torch.float64, device=device)
    strategy.model.train()
    for index, batch in enumerate(micro_batches):
        batch = on_device(batch, device, non_blocking=True)
        with strategy.no_sync(index < len(micro_batches) - 1):
            loss, stats = micro_loss(strategy.model, batch)
            strategy.backward(loss * scale)
        row = loss.detach().double().view(1)
        totals = totals + (row if stats is None else torch.cat([row, stats]))
    return totals, strategy.optimizer_step()
