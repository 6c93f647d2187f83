"""Reward modelling, and the pairwise (Bradley-Terry) loss it shares with DPO.

A preference batch from ``data.collate`` holds ``n`` chosen rows, then the
``n`` rejected rows of the same prompts. A reward model is a sequence
classifier with one output (``model.num_labels: 1``): its score of a row is the
reward ``r``, and the loss of a pair is ``-log sigmoid(r_chosen - r_rejected)``
(Ouyang et al., 2022). DPO (``dpo.py``) uses the same loss with its implicit
rewards.

Normalization mirrors ``sft.train_step`` with pairs in place of tokens: the
step's loss is the mean over every pair of the global batch (all ranks, all
micro-batches), so ``step.accumulate`` scales each micro-batch's pair-loss sum
by ``world_size / global_pairs`` and the strategy's gradient averaging over
ranks gives exactly the gradient of the global mean.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tunefleet.launcher import collectives
from tunefleet.launcher.model import attention
from tunefleet.launcher.model.inputs import IGNORE_INDEX, on_device
from tunefleet.launcher.objectives.step import StepResult, accumulate
from tunefleet.strategies.base import Strategy


@dataclass(frozen=True)
class PairStepResult(StepResult):
    num_pairs: int  # pairs in the global batch
    reward_accuracy: float  # share of pairs whose chosen reward beats the rejected one
    reward_margin: float  # mean of r_chosen - r_rejected
    reward_chosen: float
    reward_rejected: float

    def metrics(self) -> dict[str, float]:
        """The pair metrics, keyed as they appear in ``metrics.jsonl``."""
        return {"reward_accuracy": self.reward_accuracy, "reward_margin": self.reward_margin,
                "reward_chosen": self.reward_chosen, "reward_rejected": self.reward_rejected}


def pair_statistics(rewards: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss sum over real pairs, float64 sums of [pairs, correct, margin, r_chosen, r_rejected]).

    ``rewards`` holds one reward per row (chosen rows first). Pairs whose rows have no target token are
    padding (eval batches keep ranks in step with them) and count nowhere.
    """
    num = rewards.shape[0] // 2
    chosen, rejected = rewards[:num], rewards[num:]
    has_targets = (batch["labels"][:, 1:] != IGNORE_INDEX).any(-1)
    real = (has_targets[:num] & has_targets[num:]).to(rewards.dtype)
    losses = -F.logsigmoid(chosen - rejected) * real
    margin = (chosen - rejected).detach()
    stats = torch.stack([real.sum(), ((margin > 0).to(real.dtype) * real).sum(), (margin * real).sum(),
                         (chosen.detach() * real).sum(), (rejected.detach() * real).sum()])
    return losses.sum(), stats.double()


def count_pairs(micro_batches: list[dict[str, torch.Tensor]], device: torch.device) -> tuple[int, int, int]:
    """Global (pairs, target tokens, non-pad input tokens) of this step's batches."""
    local = torch.tensor([[
        mb["input_ids"].shape[0] // 2, int((mb["labels"][:, 1:] != IGNORE_INDEX).sum()), int(mb["attention_mask"].sum())
    ] for mb in micro_batches], dtype=torch.float64, device=device).sum(0)
    pairs, targets, inputs = collectives.all_reduce(local).tolist()
    return int(pairs), int(targets), int(inputs)


def pair_result(totals: list[float], num_tokens: int, num_input_tokens: int,
                grad_norm: float | None) -> PairStepResult:
    """Means per pair of reduced ``[loss, pairs, correct, margin, r_chosen, r_rejected]`` sums."""
    loss_sum, pairs, correct, margin, chosen, rejected = totals
    per_pair = max(pairs, 1.0)
    return PairStepResult(
        loss=loss_sum / per_pair, num_tokens=num_tokens, num_input_tokens=num_input_tokens, grad_norm=grad_norm,
        num_pairs=int(pairs), reward_accuracy=correct / per_pair, reward_margin=margin / per_pair,
        reward_chosen=chosen / per_pair, reward_rejected=rejected / per_pair,
    )


def pair_metrics(result: PairStepResult) -> dict[str, float]:
    """An evaluation's figures, keyed as they appear in ``metrics.jsonl``."""
    return {"eval_loss": result.loss, "eval_reward_accuracy": result.reward_accuracy,
            "eval_reward_margin": result.reward_margin}


def scores(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per row: the one-output head's score (of the last non-pad token), in float32."""
    return attention.forward(model, batch).logits[:, 0].float()


# Per row of a pair batch (chosen rows first): its reward under the model given; differentiable.
RowRewards = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def pair_step(strategy: Strategy, micro_batches: list[dict[str, torch.Tensor]], device: torch.device,
              rewards: RowRewards) -> PairStepResult:
    """Forward/backward every micro-batch of pairs on this rank, then one optimizer step (reward
    modelling and DPO differ only in ``rewards``)."""
    global_pairs, global_targets, global_inputs = count_pairs(micro_batches, device)

    def pair_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return pair_statistics(rewards(model, batch), batch)

    totals, grad_norm = accumulate(strategy, micro_batches, device, pair_loss, global_count=global_pairs)
    return pair_result(collectives.all_reduce(totals).tolist(), global_targets, global_inputs, grad_norm)


@torch.no_grad()
def pair_evaluate(strategy: Strategy, batches: list[dict[str, torch.Tensor]], device: torch.device,
                  rewards: RowRewards) -> dict[str, float]:
    """Mean pairwise loss, reward accuracy and margin over every rank's eval pairs."""
    strategy.model.eval()
    totals = torch.zeros(6, dtype=torch.float64, device=device)
    for batch in batches:
        batch = on_device(batch, device)
        loss, stats = pair_statistics(rewards(strategy.model, batch), batch)
        totals += torch.cat([loss.double().view(1), stats])
    return pair_metrics(pair_result(collectives.all_reduce(totals).tolist(), 0, 0, None))


def reward_step(strategy: Strategy, micro_batches: list[dict[str, torch.Tensor]],
                device: torch.device) -> PairStepResult:
    return pair_step(strategy, micro_batches, device, scores)


def reward_evaluate(strategy: Strategy, batches: list[dict[str, torch.Tensor]],
                    device: torch.device) -> dict[str, float]:
    return pair_evaluate(strategy, batches, device, scores)
