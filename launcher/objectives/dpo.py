"""Direct Preference Optimization: one optimizer step and one evaluation pass.

A preference batch from ``data.collate`` holds ``n`` chosen rows, then the
``n`` rejected rows of the same prompts. A sequence's log-probability is the
sum of its target tokens' log-probabilities (the response; the prompt is
masked). With rewards ``r = beta * (log pi(y|x) - log pi_ref(y|x))`` the loss of
a pair is ``-log sigmoid(r_chosen - r_rejected)`` (Rafailov et al., 2023).

The reference is frozen: for LoRA and QLoRA it is the policy itself with its
adapters disabled (no second copy); for full fine-tuning a second, frozen copy
of the starting weights on every rank.

The pairwise loss, its statistics and its normalization over the global batch
(pairs in place of tokens, as in ``sft.train_step``) are shared with reward
modelling, in ``reward.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunefleet.launcher.config import MethodConfig, ModelConfig
from tunefleet.launcher.model import attention
from tunefleet.launcher.model.inputs import IGNORE_INDEX
from tunefleet.launcher.objectives import reward
from tunefleet.launcher.objectives.reward import PairStepResult
from tunefleet.strategies.base import Strategy


def load_reference(model: ModelConfig, method: MethodConfig, model_path: str,
                   device: torch.device) -> torch.nn.Module | None:
    """The frozen reference for full fine-tuning; None for adapters (the policy with adapters disabled)."""
    if method.kind != "full":
        return None
    from tunefleet.launcher.model.modeling import load_model

    return load_model(model, method, model_path).to(device).eval().requires_grad_(False)


def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per row: the sum of the log-probabilities of its target tokens."""
    logits = attention.forward(model, batch).logits[:, :-1].float()
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
    return reward.pair_statistics(beta * (policy - reference), batch)


def implicit_rewards(strategy: Strategy, reference: torch.nn.Module | None, beta: float) -> reward.RowRewards:
    """DPO's per-row reward: ``beta * (log pi(y|x) - log pi_ref(y|x))``."""

    def rewards(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        reference_side = reference_logps(strategy, reference, batch)
        return beta * (sequence_logps(model, batch) - reference_side)

    return rewards


def dpo_step(strategy: Strategy, reference: torch.nn.Module | None, micro_batches: list[dict[str, torch.Tensor]],
             device: torch.device, *, beta: float) -> PairStepResult:
    """Forward/backward every micro-batch of pairs on this rank, then one optimizer step."""
    return reward.pair_step(strategy, micro_batches, device, implicit_rewards(strategy, reference, beta))


def dpo_evaluate(strategy: Strategy, reference: torch.nn.Module | None, batches: list[dict[str, torch.Tensor]],
                 device: torch.device, *, beta: float) -> dict[str, float]:
    """Mean DPO loss, reward accuracy and margin over every rank's eval pairs."""
    return reward.pair_evaluate(strategy, batches, device, implicit_rewards(strategy, reference, beta))
