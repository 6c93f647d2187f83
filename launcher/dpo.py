"""Direct Preference Optimization: one optimizer step and one evaluation pass.

A preference batch from ``data.collate`` holds ``n`` chosen rows, then the
``n`` rejected rows of the same prompts. A sequence's log-probability is the
sum of its target tokens' log-probabilities (the response; the prompt is
masked). With rewards ``r = beta * (log pi(y|x) - log pi_ref(y|x))`` the loss of
a pair is ``-log sigmoid(r_chosen - r_rejected)`` (Rafailov et al., 2023).

The reference is frozen: for LoRA and QLoRA it is the policy itself with its
adapters disabled (no second copy); for full fine-tuning a second, frozen copy
of the starting weights on every rank.

Normalization mirrors ``steps.train_step`` with pairs in place of tokens: the
step's loss is the mean over every pair of the global batch (all ranks, all
micro-batches), so each micro-batch contributes its pair-loss sum scaled by
``world_size / global_pairs`` and the strategy's gradient averaging over ranks
gives exactly the gradient of the global mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tunefleet.launcher.data import IGNORE_INDEX, model_inputs
from tunefleet.launcher.recipe import Recipe
from tunefleet.launcher.steps import StepResult
from tunefleet.strategies.base import Strategy


@dataclass(frozen=True)
class DPOStepResult(StepResult):
    num_pairs: int  # pairs in the global batch
    reward_accuracy: float  # share of pairs whose chosen reward beats the rejected one
    reward_margin: float  # mean of r_chosen - r_rejected
    reward_chosen: float
    reward_rejected: float

    def metrics(self) -> dict[str, float]:
        """The DPO-only metrics, keyed as they appear in ``metrics.jsonl``."""
        return {"reward_accuracy": self.reward_accuracy, "reward_margin": self.reward_margin,
                "reward_chosen": self.reward_chosen, "reward_rejected": self.reward_rejected}


def load_reference(recipe: Recipe, model_path: str, device: torch.device) -> torch.nn.Module | None:
    """The frozen reference for full fine-tuning; None for adapters (the policy with adapters disabled)."""
    if recipe.method.kind != "full":
        return None
    from tunefleet.launcher.modeling import load_model

    return load_model(recipe.model, recipe.method, model_path).to(device).eval().requires_grad_(False)


def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per row: the sum of the log-probabilities of its target tokens."""
    logits = model(**model_inputs(batch), use_cache=False).logits[:, :-1].float()
    token_losses = F.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE_INDEX,
                                   reduction="none")
    return -token_losses.sum(-1)


@torch.no_grad()
def reference_logps(strategy: Strategy, reference: torch.nn.Module | None,
                    batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if reference is not None:
        return sequence_logps(reference, batch)
    policy = strategy.unwrapped
    was_training = policy.training
    policy.eval()
    with policy.disable_adapter():
        logps = sequence_logps(policy, batch)
    policy.train(was_training)
    return logps


def pair_statistics(policy: torch.Tensor, reference: torch.Tensor, batch: dict[str, torch.Tensor],
                    beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss sum over real pairs, float64 sums of [pairs, correct, margin, r_chosen, r_rejected])."""
    num = policy.shape[0] // 2
    rewards = beta * (policy - reference)
    chosen, rejected = rewards[:num], rewards[num:]
    has_targets = (batch["labels"][:, 1:] != IGNORE_INDEX).any(-1)
    real = (has_targets[:num] & has_targets[num:]).to(policy.dtype)  # padding pairs of eval batches are not
    losses = -F.logsigmoid(chosen - rejected) * real
    margin = (chosen - rejected).detach()
    stats = torch.stack([real.sum(), ((margin > 0).to(real.dtype) * real).sum(), (margin * real).sum(),
                         (chosen.detach() * real).sum(), (rejected.detach() * real).sum()])
    return losses.sum(), stats.double()


def _all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(values)
    return values


def _count(micro_batches: list[dict[str, torch.Tensor]], device: torch.device) -> tuple[int, int, int]:
    """Global (pairs, target tokens, non-pad input tokens) of this step's batches."""
    local = torch.tensor([[
        mb["input_ids"].shape[0] // 2, int((mb["labels"][:, 1:] != IGNORE_INDEX).sum()), int(mb["attention_mask"].sum())
    ] for mb in micro_batches], dtype=torch.float64, device=device).sum(0)
    pairs, targets, inputs = _all_reduce_sum(local).tolist()
    return int(pairs), int(targets), int(inputs)


def dpo_step(strategy: Strategy, reference: torch.nn.Module | None, micro_batches: list[dict[str, torch.Tensor]],
             device: torch.device, *, beta: float) -> DPOStepResult:
    """Forward/backward every micro-batch of pairs on this rank, then one optimizer step."""
    global_pairs, global_targets, global_inputs = _count(micro_batches, device)
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    scale = world_size / max(global_pairs, 1)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    stats = torch.zeros(5, dtype=torch.float64, device=device)
    strategy.model.train()
    for index, batch in enumerate(micro_batches):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        reference_side = reference_logps(strategy, reference, batch)
        with strategy.no_sync(index < len(micro_batches) - 1):
            policy_side = sequence_logps(strategy.model, batch)
            micro_loss, micro_stats = pair_statistics(policy_side, reference_side, batch, beta)
            strategy.backward(micro_loss * scale)
        loss_sum += micro_loss.detach().double()
        stats += micro_stats
    grad_norm = strategy.optimizer_step()
    totals = _all_reduce_sum(torch.cat([loss_sum.view(1), stats])).tolist()
    return _result(totals, global_targets, global_inputs, grad_norm)


def _result(totals: list[float], num_tokens: int, num_input_tokens: int, grad_norm: float | None) -> DPOStepResult:
    loss_sum, pairs, correct, margin, chosen, rejected = totals
    per_pair = max(pairs, 1.0)
    return DPOStepResult(
        loss=loss_sum / per_pair, num_tokens=num_tokens, num_input_tokens=num_input_tokens, grad_norm=grad_norm,
        num_pairs=int(pairs), reward_accuracy=correct / per_pair, reward_margin=margin / per_pair,
        reward_chosen=chosen / per_pair, reward_rejected=rejected / per_pair,
    )


@torch.no_grad()
def dpo_evaluate(strategy: Strategy, reference: torch.nn.Module | None, batches: list[dict[str, torch.Tensor]],
                 device: torch.device, *, beta: float) -> dict[str, float]:
    """Mean DPO loss, reward accuracy and margin over every rank's eval pairs."""
    strategy.model.eval()
    totals = torch.zeros(6, dtype=torch.float64, device=device)
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        policy_side, reference_side = sequence_logps(strategy.model, batch), reference_logps(strategy, reference, batch)
        loss, stats = pair_statistics(policy_side, reference_side, batch, beta)
        totals += torch.cat([loss.double().view(1), stats])
    result = _result(_all_reduce_sum(totals).tolist(), 0, 0, None)
    return {"eval_loss": result.loss, "eval_reward_accuracy": result.reward_accuracy,
            "eval_reward_margin": result.reward_margin}
