"""The policy side of online RL (GRPO, and the policy loss of PPO), as pure tensor functions.

A rollout batch holds ``num_prompts * group_size`` completions: the
completions of one prompt are consecutive. Every per-token tensor here is
aligned with the *predicted* tokens: position ``t`` of ``token_log_probs``
scores ``tokens[:, t + 1]``, as in causal-LM training, so a completion mask is
``labels[:, 1:] != IGNORE_INDEX`` (``completion_mask``): prompt and padding
tokens carry 0 and count nowhere.

Normalization and data parallelism: ``clipped_policy_loss`` divides a masked
sum by a count, by default the count of this call. For data-parallel training
pass the *global* count (``count_units`` of every micro-batch, all-reduced over
ranks) and multiply the loss by ``world_size`` before the backward, exactly as
``sft.train_step`` scales by ``world_size / global_targets``: after the
strategy averages gradients over ranks the gradient is that of the global
mean, whatever the split into ranks and micro-batches. Statistics are kept as
sums (``PolicyLoss.sums``) for the same reason: add them over micro-batches,
all-reduce them, then ``policy_metrics`` turns them into means.

References: Shao et al., 2024 (DeepSeekMath, GRPO); Schulman et al., 2017
(PPO); Yu et al., 2025 (DAPO: the token average and the asymmetric clip);
Schulman, "Approximating KL divergence", 2020 (k1 and k3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from tunefleet.launcher.model.inputs import IGNORE_INDEX

KlKind = Literal["k1", "k3"]
Average = Literal["token", "sequence"]
ENTROPY_CHUNK_TOKENS = 256  # positions whose fp32 softmax is alive at once in entropy_from_logits


@dataclass(frozen=True)
class GroupAdvantages:
    advantages: torch.Tensor  # [num_prompts * group_size], one per completion
    group_std: torch.Tensor  # [num_prompts], Bessel-corrected std of each group's rewards

    @property
    def zero_std_fraction(self) -> float:
        """Share of groups whose completions all scored alike: they carry no learning signal."""
        return float(torch.isclose(self.group_std, torch.zeros_like(self.group_std)).float().mean())


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: bool = True,
                     eps: float = 1e-4) -> GroupAdvantages:
    """GRPO outcome advantages: each reward minus its group's mean, over the group's std + ``eps`` if ``scale``.

    The std is Bessel-corrected (divides by ``group_size - 1``), as TRL's GRPO trainer does, so the
    advantages match the peer we benchmark against; it is why ``group_size`` must be at least 2 (one
    completion per prompt has no relative signal anyway). ``scale=False`` is Dr. GRPO's unscaled variant.
    """
    if group_size < 2 or rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"need 1-D rewards in whole groups of >= 2, got shape {tuple(rewards.shape)} "
                         f"and group_size {group_size}")
    grouped = rewards.float().view(-1, group_size)
    std = grouped.std(dim=1, correction=1)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    advantages = centred / (std.unsqueeze(1) + eps) if scale else centred
    return GroupAdvantages(advantages=advantages.flatten(), group_std=std)


def completion_mask(labels: torch.Tensor) -> torch.Tensor:
    """[B, T-1] float mask of the predicted tokens that are completion tokens (labels not ignored)."""
    return (labels[:, 1:] != IGNORE_INDEX).float()


def token_log_probs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[B, T-1] fp32 log-probability of each taken token: ``logits[:, :-1]`` predict ``tokens[:, 1:]``.

    One row at a time in the ``gather - logsumexp`` form, so only one row's fp32 copy of the logits is
    alive at once instead of a [B, T, V] fp32 log-softmax (V is ~150k for recent tokenizers).
    """
    rows = []
    for row_logits, row_tokens in zip(logits[:, :-1], tokens[:, 1:], strict=True):
        row_logits = row_logits.float()
        taken = row_logits.gather(-1, row_tokens.unsqueeze(-1)).squeeze(-1)
        rows.append(taken - row_logits.logsumexp(-1))
    return torch.stack(rows)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: KlKind = "k3") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the log-probs of tokens sampled from the policy.

    ``k1 = logp - ref_logp`` is unbiased but can be negative per token; ``k3 = exp(ref - logp) - (ref -
    logp) - 1`` is unbiased and never negative (the GRPO paper's choice).
    """
    if kind == "k1":
        return logp - ref_logp
    if kind == "k3":
        log_ratio = ref_logp - logp
        return torch.exp(log_ratio) - log_ratio - 1
    raise ValueError(f"unknown KL estimator {kind!r}: use 'k1' or 'k3'")


@dataclass(frozen=True)
class PolicyLoss:
    """The clipped surrogate and its statistics; the statistics are detached sums, not yet means,
    so micro-batches and ranks can be added up before dividing (``sums``, ``policy_metrics``)."""

    loss: torch.Tensor  # differentiable scalar, averaged as asked
    num_tokens: torch.Tensor  # completion tokens in this call
    num_clipped: torch.Tensor  # completion tokens where the clipped term was chosen
    kl_sum: torch.Tensor  # sum of the per-token KL over completion tokens (0 without a KL)
    ratio_sum: torch.Tensor  # sum of pi/pi_old over completion tokens

    def sums(self) -> torch.Tensor:
        """float64 [num_tokens, num_clipped, kl_sum, ratio_sum]: add over micro-batches, all-reduce over ranks."""
        return torch.stack([self.num_tokens, self.num_clipped, self.kl_sum, self.ratio_sum]).double()

    @property
    def clip_fraction(self) -> torch.Tensor:
        return self.num_clipped / self.num_tokens.clamp(min=1)

    @property
    def mean_kl(self) -> torch.Tensor:
        return self.kl_sum / self.num_tokens.clamp(min=1)

    @property
    def mean_ratio(self) -> torch.Tensor:
        return self.ratio_sum / self.num_tokens.clamp(min=1)


def policy_metrics(sums: list[float]) -> dict[str, float]:
    """Means over completion tokens of reduced ``PolicyLoss.sums``, keyed as in ``metrics.jsonl``."""
    num_tokens, num_clipped, kl_sum, ratio_sum = sums
    per_token = max(num_tokens, 1.0)
    return {"clip_fraction": num_clipped / per_token, "kl": kl_sum / per_token, "ratio": ratio_sum / per_token}


def count_units(mask: torch.Tensor, average: Average) -> torch.Tensor:
    """What ``clipped_policy_loss`` divides by, for this batch: completion tokens (``"token"``) or
    sequences with at least one completion token (``"sequence"``). All-reduce it for the global count."""
    mask = mask.float()
    if average == "token":
        return mask.sum()
    if average == "sequence":
        return (mask.sum(-1) > 0).float().sum()
    raise ValueError(f"unknown average {average!r}: use 'token' or 'sequence'")


def unit_weights(mask: torch.Tensor, average: Average) -> torch.Tensor:
    """Per-token weights whose weighted sum, divided by ``count_units``, is the asked average."""
    mask = mask.float()
    return mask if average == "token" else mask / mask.sum(-1, keepdim=True).clamp(min=1)


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                        *, clip_eps: float, clip_eps_high: float | None = None, kl: torch.Tensor | None = None,
                        kl_coef: float = 0.0, average: Average = "token",
                        num_units: float | torch.Tensor | None = None) -> PolicyLoss:
    """PPO/GRPO clipped surrogate: per token ``-min(r*A, clip(r, 1-eps, 1+eps_high)*A) + kl_coef*kl``.

    ``r = exp(logp - old_logp)``. ``advantages`` is per token ([B, T]) or per sequence ([B], GRPO's
    outcome advantage, broadcast over the sequence's tokens). ``clip_eps_high`` defaults to ``clip_eps``
    (DAPO raises it to let unlikely tokens grow). ``average="token"`` divides the sum over every
    completion token by their number (DAPO); ``"sequence"`` averages within each sequence, then over
    sequences (the original GRPO), so a long completion weighs as much as a short one. ``num_units`` is
    the divisor, ``count_units`` of this call when None: pass the global count for data parallelism.
    """
    if kl_coef and kl is None:
        raise ValueError("kl_coef is set but no per-token kl was given")
    local_units = count_units(mask, average)
    divisor = local_units if num_units is None else torch.as_tensor(num_units, device=mask.device)
    keep = mask > 0  # where, not a product: an inf on a padding position must not become a NaN
    high = clip_eps if clip_eps_high is None else clip_eps_high
    advantages = advantages.unsqueeze(-1) if advantages.ndim == 1 else advantages
    ratio = torch.exp(torch.where(keep, logp - old_logp, 0.0))
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    kl = None if kl is None else torch.where(keep, kl, 0.0)
    if kl is not None and kl_coef:
        per_token = per_token + kl_coef * kl
    weighted = torch.where(keep, per_token, 0.0) * unit_weights(mask, average)
    loss = weighted.sum() / divisor.to(weighted.dtype).clamp(min=1)
    return PolicyLoss(loss=loss, **_token_sums(ratio.detach(), (clipped < unclipped).detach(), kl, mask.float()))


def _token_sums(ratio: torch.Tensor, clipped: torch.Tensor, kl: torch.Tensor | None,
                mask: torch.Tensor) -> dict[str, torch.Tensor]:
    kl_sum = (kl.detach() * mask).sum() if kl is not None else torch.zeros((), device=mask.device)
    return {"num_tokens": mask.sum(), "num_clipped": (clipped.float() * mask).sum(), "kl_sum": kl_sum,
            "ratio_sum": (ratio * mask).sum()}


@torch.no_grad()
def entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the next-token distributions at the masked positions; a metric, no grad.

    ``mask`` has ``logits.shape[:-1]``. Only masked positions are computed, ``ENTROPY_CHUNK_TOKENS`` at
    a time, so no full-vocabulary fp32 copy of the batch is made. 0 when nothing is masked.
    """
    selected = logits[mask.bool()]
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for chunk in selected.split(ENTROPY_CHUNK_TOKENS):
        log_probs = chunk.float().log_softmax(-1)
        total += -(log_probs.exp() * log_probs).sum().double()
    return (total / max(selected.shape[0], 1)).float()
