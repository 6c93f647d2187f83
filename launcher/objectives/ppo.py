"""PPO for language models, as in RLHF (Schulman et al., 2017; Ziegler et al., 2019; Ouyang et al., 2022).

It shares GRPO's rollouts, rewards, reference and evaluation (``grpo.Grpo``) and replaces the group
comparison with a learned baseline: a value head on the policy (``model/value_head.py``) estimates the
return at every completion token, and generalized advantage estimation (``value.gae``) turns the rewards
into per-token advantages. The rewards are the sequence's score (a reward model's, or any reward of
``method.rl.reward``) on its last token, minus ``kl_coef`` times the per-token KL to the frozen reference on
every token: the KL is a penalty inside the reward, not a loss term.

One train step: every rank samples ``group_size`` completions of each of its prompts and scores them; a
no-grad forward of the sampling policy gives the old log-probabilities and values, the reference's forward
the KL; GAE gives advantages (whitened over the rank's completion tokens) and returns. Then ``epochs``
optimizer updates minimize the clipped surrogate plus ``vf_coef`` times the clipped value loss, both means
over every completion token of the global batch (``step.accumulate``).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from tunefleet.launcher import collectives
from tunefleet.launcher.model import inputs, value_head
from tunefleet.launcher.objectives import policy_gradient as pg
from tunefleet.launcher.objectives import value
from tunefleet.launcher.objectives.grpo import (
    Grpo,
    GrpoStepResult,
    RolloutFigures,
    prompts_of,
    split_rows,
    training_rows,
)
from tunefleet.launcher.objectives.rollout import rollout_seed
from tunefleet.launcher.objectives.step import Batch, accumulate
from tunefleet.strategies.base import Strategy

# What the rollout pass adds up per rank for explained variance: [tokens, sum R, sum R^2, sum R-V, sum (R-V)^2].
_RETURN_SUMS = 5


class Ppo(Grpo):
    """The PPO objective of a run: GRPO's rollouts and rewards, a value head's baseline, GAE advantages."""

    def step(self, strategy: Strategy, micro_batches: list[Batch], device: torch.device, *,
             step: int) -> GrpoStepResult:
        """Collective: sample, score, estimate advantages and update ``rl.epochs`` times on this rank's prompts."""
        rl, rank = self.rl, dist.get_rank() if dist.is_initialized() else 0
        started = time.perf_counter()
        prompts = prompts_of(micro_batches, self.tokenizer)
        completions = self.rollout.sample(prompts.prompt_ids, num_samples=rl.group_size,
                                          seed=rollout_seed(self.seed, step, rank))
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        repeated = [row for row in prompts.rows for _ in range(rl.group_size)]
        scores = self.rewards.score([row["prompt"] for row in repeated], texts, repeated)
        score_tensor = torch.tensor(scores.total, dtype=torch.float32)
        rows = training_rows(prompts.prompt_ids, completions, torch.zeros(len(completions)),
                             group_size=rl.group_size, pad_id=self.tokenizer.pad_token_id)
        rows["scores"] = score_tensor
        batches = split_rows(rows, self.rows_per_micro_batch)
        self.head = value_head.find(strategy.unwrapped)
        return_sums = self.add_advantages(strategy, batches, device)
        rollout_s = time.perf_counter() - started

        started = time.perf_counter()
        tokens = sum(pg.count_units(pg.completion_mask(b["labels"]), "token") for b in batches)
        global_tokens = float(collectives.all_reduce(torch.as_tensor(tokens, dtype=torch.float64, device=device)))
        for _ in range(rl.epochs):
            totals, grad_norm = accumulate(strategy, batches, device, self.micro_loss, global_count=global_tokens)
        optimize_s = time.perf_counter() - started
        loss_sum, *policy_sums, entropy_sum, value_loss_sum, value_clipped = collectives.all_reduce(totals).tolist()
        rollouts = RolloutFigures.reduce(scores, rows, device, *return_sums)
        updates = max(policy_sums[0], 1.0)  # completion tokens over every update of the step
        figures = {**rollouts.figures, **pg.policy_metrics(policy_sums), "entropy": entropy_sum / updates,
                   "value_loss": value_loss_sum / updates, "value_clip_fraction": value_clipped / updates,
                   **return_figures(rollouts.extra), "rollout_s": rollout_s, "optimize_s": optimize_s}
        return GrpoStepResult(loss=loss_sum / max(global_tokens, 1.0), num_tokens=rollouts.completion_tokens,
                              num_input_tokens=rollouts.input_tokens, grad_norm=grad_norm, figures=figures)

    @torch.no_grad()
    def add_advantages(self, strategy: Strategy, batches: list[Batch], device: torch.device) -> list[float]:
        """Per micro-batch: the sampling policy's log-probabilities and values, the reference's (with a KL
        term), and GAE's advantages (whitened over every completion token of this rank) and returns. Returns
        this rank's sums for explained variance (``_RETURN_SUMS``)."""
        rl, model = self.rl, strategy.model
        for batch in batches:
            scores = batch.pop("scores").to(device)
            tensors = inputs.on_device(batch, device)
            if rl.kl_coef:
                batch["ref_logp"] = self.reference_log_probs(strategy, tensors, device).cpu()
            model.eval()
            logp = self.log_probs(model, tensors)[0]
            values = value_head.values(self.head)[:, :-1]
            mask = pg.completion_mask(tensors["labels"])
            rewards = value.reward_at_last_token(scores, mask)
            if rl.kl_coef:
                rewards = rewards - rl.kl_coef * pg.kl_penalty(logp, batch["ref_logp"].to(device), rl.kl_estimator)
            advantages, returns = value.gae(rewards, values, mask, gamma=rl.gamma, lam=rl.lam)
            batch.update(old_logp=logp.cpu(), old_values=values.cpu(), returns=returns.cpu(),
                         advantages=advantages.cpu())
        masks = [pg.completion_mask(b["labels"]) for b in batches]
        flat = torch.cat([b["advantages"][m > 0] for b, m in zip(batches, masks, strict=True)])
        mean, scale = flat.mean(), torch.rsqrt(flat.var(correction=0) + value.WHITEN_EPS)  # unused if flat is empty
        for batch, mask in zip(batches, masks, strict=True):
            batch["advantages"] = torch.where(mask > 0, (batch["advantages"] - mean) * scale, 0.0)
        return return_sums(batches, masks)

    def micro_loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(clipped surrogate + vf_coef * clipped value loss, summed over this micro-batch's completion tokens;
        float64 [tokens, clipped, kl, ratio, entropy, value loss, value clipped sums])."""
        rl = self.rl
        logp, logits = self.log_probs(model, batch)
        values = value_head.values(self.head)[:, :-1]
        mask = pg.completion_mask(batch["labels"])
        kl = pg.kl_penalty(logp.detach(), batch["ref_logp"], rl.kl_estimator) if rl.kl_coef else None
        policy = pg.clipped_policy_loss(logp, batch["old_logp"], batch["advantages"], mask, clip_eps=rl.clip_eps,
                                        clip_eps_high=rl.clip_eps_high, kl=kl, average="token", num_units=1.0)
        critic = value.clipped_value_loss(values, batch["old_values"], batch["returns"], mask, rl.value_clip_eps,
                                          num_tokens=1.0)
        entropy = pg.entropy_from_logits(logits[:, :-1], mask) * mask.sum()
        stats = torch.cat([policy.sums(), entropy.double().view(1), critic.loss.detach().double().view(1),
                           critic.num_clipped.double().view(1)])
        return policy.loss + rl.vf_coef * critic.loss, stats


def return_sums(batches: list[Batch], masks: list[torch.Tensor]) -> list[float]:
    """This rank's [tokens, sum R, sum R^2, sum R-V, sum (R-V)^2] over completion tokens (returns R, old values V)."""
    sums = torch.zeros(_RETURN_SUMS, dtype=torch.float64)
    for batch, mask in zip(batches, masks, strict=True):
        keep = mask > 0
        returns, residual = batch["returns"][keep].double(), (batch["returns"] - batch["old_values"])[keep].double()
        sums += torch.stack([keep.sum().double(), returns.sum(), (returns ** 2).sum(), residual.sum(),
                             (residual ** 2).sum()])
    return sums.tolist()


def return_figures(sums: list[float]) -> dict[str, float]:
    """Mean return, and explained variance ``1 - Var[R - V] / Var[R]`` of the rollouts' values over every rank's
    completion tokens (1: the values predict the returns; 0: no better than their mean; 0 when R is constant)."""
    count, total, squares, residual_total, residual_squares = sums
    count = max(count, 1.0)
    returns_var = squares / count - (total / count) ** 2
    residual_var = residual_squares / count - (residual_total / count) ** 2
    explained = 1.0 - residual_var / returns_var if returns_var > 1e-12 else 0.0
    return {"return_mean": total / count, "explained_variance": explained}
