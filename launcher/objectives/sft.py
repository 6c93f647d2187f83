"""Supervised fine-tuning: one optimizer step on the next-token (or classifier) loss, and evaluation passes,
independent of Ray.

The step's loss is the mean over every target token of the *global* batch (all ranks, all micro-batches);
``step.accumulate`` scales each micro-batch's token-loss sum so that the strategy's gradient average over ranks is
exactly the gradient of that mean. The step is then invariant to how the global batch is split into ranks and
micro-batches, which the numerical tests check.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunefleet.launcher import collectives
from tunefleet.launcher.model import attention
from tunefleet.launcher.model.inputs import IGNORE_INDEX, on_device
from tunefleet.launcher.objectives.step import StepResult, accumulate
from tunefleet.strategies.base import Strategy


def token_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of next-token cross-entropy over positions whose label is not ignored
    (classification batches, one label per row: the sum over rows)."""
    logits = attention.forward(model, batch).logits
    if batch["labels"].ndim == 1:
        return F.cross_entropy(logits.float(), batch["labels"], ignore_index=IGNORE_INDEX, reduction="sum")
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        labels.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def _count_targets(batch: dict[str, torch.Tensor]) -> int:
    labels = batch["labels"] if batch["labels"].ndim == 1 else batch["labels"][:, 1:]
    return int((labels != IGNORE_INDEX).sum())


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    return collectives.all_reduce(torch.tensor(values, dtype=torch.float64, device=device)).tolist()


def train_step(strategy: Strategy, micro_batches: list[dict[str, torch.Tensor]], device: torch.device) -> StepResult:
    """Forward/backward every micro-batch of this rank, then one optimizer step."""
    local_targets = sum(_count_targets(mb) for mb in micro_batches)
    local_inputs = sum(int(mb["attention_mask"].sum()) for mb in micro_batches)
    global_targets, global_inputs = _all_reduce_sum([local_targets, local_inputs], device)
    loss_sum, grad_norm = accumulate(strategy, micro_batches, device, _token_loss, global_count=global_targets)
    (global_loss_sum,) = collectives.all_reduce(loss_sum).tolist()
    return StepResult(
        loss=global_loss_sum / max(global_targets, 1.0),
        num_tokens=int(global_targets),
        num_input_tokens=int(global_inputs),
        grad_norm=grad_norm,
    )


def _token_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, None]:
    return token_loss_sum(model, batch), None


@torch.no_grad()
def evaluate(strategy: Strategy, batches: list[dict[str, torch.Tensor]], device: torch.device) -> float:
    """Mean target-token loss over this rank's eval batches, reduced over ranks."""
    model = strategy.model
    model.eval()
    loss_sum, targets = 0.0, 0
    for batch in batches:
        batch = on_device(batch, device)
        loss_sum += float(token_loss_sum(model, batch))
        targets += _count_targets(batch)
    total_loss, total_targets = _all_reduce_sum([loss_sum, targets], device)
    return total_loss / max(total_targets, 1.0)


@torch.no_grad()
def evaluate_classifier(strategy: Strategy, batches: list[dict[str, torch.Tensor]], device: torch.device,
                        num_labels: int) -> dict[str, float]:
    """Loss, accuracy and macro F1 of a sequence classifier over every rank's eval rows.

    Per-class counts (true positives, predicted, actual) are summed over ranks
    before dividing, so the figures are those of the whole eval set; padding
    rows (label ignored) count nowhere. Macro F1 averages the classes that
    occur in the labels or the predictions.
    """
    model = strategy.model
    model.eval()
    loss_sum = torch.zeros(1, dtype=torch.float64, device=device)
    counts = torch.zeros(3, num_labels, dtype=torch.float64, device=device)
    for batch in batches:
        batch = on_device(batch, device)
        logits = attention.forward(model, batch).logits.float()
        labels = batch["labels"]
        loss_sum += F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum").double()
        real = labels != IGNORE_INDEX
        predicted, actual = logits.argmax(-1)[real], labels[real]
        counts += torch.stack([
            torch.bincount(actual[predicted == actual], minlength=num_labels),
            torch.bincount(predicted, minlength=num_labels),
            torch.bincount(actual, minlength=num_labels),
        ]).double()
    totals = collectives.all_reduce(torch.cat([loss_sum, counts.flatten()]))
    true_positive, predicted, actual = totals[1:].view(3, num_labels)
    rows = max(float(actual.sum()), 1.0)
    seen = (predicted + actual) > 0
    f1 = (2 * true_positive[seen] / (predicted[seen] + actual[seen])).mean() if seen.any() else torch.zeros(())
    return {"eval_loss": float(totals[0]) / rows, "eval_accuracy": float(true_positive.sum()) / rows,
            "eval_f1": float(f1)}
