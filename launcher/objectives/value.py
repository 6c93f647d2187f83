"""The value side of PPO: generalized advantage estimation, the clipped value loss, and their checks.

Per-token tensors are [B, T] and aligned as in ``policy_gradient`` (position
``t`` is the prediction of token ``t + 1``); ``mask`` is 1 on completion
tokens, 0 on prompt and padding tokens, which take no part in any formula here.
A sequence's outcome reward sits on its last completion token
(``reward_at_last_token``); a caller that penalizes the KL to a reference per
token adds ``-kl_coef * kl`` to ``rewards`` before ``gae``.

The value loss normalizes like ``policy_gradient.clipped_policy_loss`` with
``average="token"``: a masked sum over a count that defaults to this call's
completion tokens; pass the global count (and scale by ``world_size``) for data
parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

WHITEN_EPS = 1e-8  # added to the variance: a batch of equal advantages whitens to zeros, not NaN


def reward_at_last_token(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T] rewards: each row's score ([B]) on its last completion token, 0 elsewhere (and on rows
    without completion tokens)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask > 0, positions, -1).amax(dim=1)
    rewards = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    has_tokens = last >= 0
    rewards[has_tokens.nonzero().squeeze(1), last[has_tokens]] = scores[has_tokens].float()
    return rewards


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), fp32 [B, T], by generalized advantage estimation (Schulman et al., 2016).

    Right to left over each row's completion tokens only: ``delta_t = r_t + gamma * V_next - V_t`` and
    ``A_t = delta_t + gamma * lam * A_next``, where "next" is the row's next completion token, and
    ``V_next = A_next = 0`` after its last one (the episode ends with the completion). Returns are
    ``A + V``. Both are 0 off the mask.
    """
    keep = mask > 0
    rewards, values = rewards.float(), values.float()
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        next_advantage = torch.where(keep[:, t], advantage, next_advantage)
        next_value = torch.where(keep[:, t], values[:, t], next_value)
        advantages[:, t] = torch.where(keep[:, t], advantage, 0.0)
    return advantages, torch.where(keep, advantages + values, 0.0)


@dataclass(frozen=True)
class ValueLoss:
    loss: torch.Tensor  # differentiable scalar: masked token mean of 0.5 * max(unclipped, clipped) squared error
    num_tokens: torch.Tensor  # completion tokens in this call
    num_clipped: torch.Tensor  # completion tokens where the clipped error was the larger one

    @property
    def clip_fraction(self) -> torch.Tensor:
        return self.num_clipped / self.num_tokens.clamp(min=1)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       clip_eps: float, *, num_tokens: float | torch.Tensor | None = None) -> ValueLoss:
    """PPO's value loss: ``0.5 * max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2)`` per token.

    Taking the larger error keeps the value head from moving further than ``clip_eps`` from the values
    the advantages were computed with. Averaged over completion tokens; ``num_tokens`` (default: this
    call's) is the divisor, the global count for data parallelism.
    """
    keep = mask > 0
    clipped_values = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    per_token = 0.5 * torch.maximum(unclipped_error, clipped_error)
    local_tokens = keep.float().sum()
    divisor = local_tokens if num_tokens is None else torch.as_tensor(num_tokens, device=mask.device)
    loss = torch.where(keep, per_token, 0.0).sum() / divisor.to(per_token.dtype).clamp(min=1)
    num_clipped = (keep & (clipped_error > unclipped_error)).float().sum()
    return ValueLoss(loss=loss, num_tokens=local_tokens, num_clipped=num_clipped)


def masked_mean_var(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, population variance) of ``x`` over the masked positions, in fp32."""
    keep = mask > 0
    count = keep.float().sum().clamp(min=1)
    mean = torch.where(keep, x.float(), 0.0).sum() / count
    var = torch.where(keep, (x.float() - mean) ** 2, 0.0).sum() / count
    return mean, var


@torch.no_grad()
def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var[R - V] / Var[R]`` over completion tokens: 1 for perfect values, 0 for predicting the
    mean return, negative for worse; NaN when the returns do not vary (nothing to explain)."""
    _, residual_var = masked_mean_var(returns - values, mask)
    _, returns_var = masked_mean_var(returns, mask)
    if returns_var == 0:
        return torch.tensor(float("nan"), device=values.device)
    return 1 - residual_var / returns_var


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / sqrt(var + WHITEN_EPS)`` with this batch's masked mean and population variance;
    0 off the mask. Statistics are local to the call (per rank), as PPO implementations whiten."""
    mean, var = masked_mean_var(x, mask)
    return torch.where(mask > 0, (x.float() - mean) * torch.rsqrt(var + WHITEN_EPS), 0.0)
