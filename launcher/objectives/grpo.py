"""GRPO (Shao et al., 2024, DeepSeekMath): online RL with rewards computed by code, without a value model.

One train step: every rank takes its prompts of the step's global batch (``prompt`` rows: the prompt,
then its reference answer as the target), samples ``group_size`` completions of each (``rollout.py``),
scores them (``rl_rewards.py``) and turns the scores into advantages relative to the group's mean and
std (``policy_gradient.group_advantages``; a group lives on one rank, so no rank waits for another).
Then ``epochs`` optimizer updates on those rollouts minimize the clipped surrogate plus ``kl_coef`` times
the per-token KL to the frozen reference, the mean over every completion token (or completion) of the
global batch, normalized as every objective is (``step.accumulate``).

The old policy's log-probabilities are those of the weights that sampled: on the first update the
ratio is 1 (its value is the forward's own, detached); later updates compare with log-probabilities
computed once before the first. Log-probabilities are taken at the sampling temperature, as sampled.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from tunefleet.launcher import collectives
from tunefleet.launcher.config import RlConfig
from tunefleet.launcher.model import attention
from tunefleet.launcher.model.inputs import IGNORE_INDEX, ROW_FIELDS, on_device
from tunefleet.launcher.objectives import policy_gradient as pg
from tunefleet.launcher.objectives import sft
from tunefleet.launcher.objectives.rl_rewards import WeightedRewards
from tunefleet.launcher.objectives.rollout import Rollout, rollout_seed
from tunefleet.launcher.objectives.step import Batch, StepResult, accumulate
from tunefleet.strategies.base import Strategy

Row = Mapping[str, Any]  # what a reward function sees of a prompt row: `prompt`, `answer` text and its other fields


@dataclass(frozen=True)
class GrpoStepResult(StepResult):
    figures: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        return self.figures


@dataclass(frozen=True)
class PromptBatch:
    """One rank's prompts of a step, as token ids, with the rows their rewards read."""

    prompt_ids: list[list[int]]
    rows: list[Row]
    real: list[bool]  # False: a padding row that keeps ranks in step (evaluation)


def prompts_of(micro_batches: list[Batch], tokenizer) -> PromptBatch:
    """The prompt (non-target tokens before the answer) and answer text of every collated prompt row, beside
    the row's other fields."""
    prompt_ids, rows, real = [], [], []
    for batch in micro_batches:
        fields = batch.get(ROW_FIELDS) or [{}] * len(batch["input_ids"])
        for ids, labels, mask, others in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], fields,
                                             strict=True):
            ids, labels = ids[mask.bool()].tolist(), labels[mask.bool()].tolist()
            start = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(ids))
            prompt, answer = ids[:start] or ids[:1], [t for t in labels[start:] if t != IGNORE_INDEX]
            prompt_ids.append(prompt)
            rows.append({**others, "prompt": tokenizer.decode(prompt, skip_special_tokens=True),
                         "answer": tokenizer.decode(answer, skip_special_tokens=True)})
            real.append(bool(answer))
    return PromptBatch(prompt_ids, rows, real)


def training_rows(prompt_ids: list[list[int]], completions: list[list[int]], advantages: torch.Tensor, *,
                  group_size: int, pad_id: int) -> Batch:
    """Right-padded prompt + completion rows; labels mark the completion tokens, ``advantages`` is per row."""
    sequences = [(prompt_ids[i // group_size], completion) for i, completion in enumerate(completions)]
    width = max(len(p) + max(len(c), 1) for p, c in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    attention_mask = torch.zeros_like(input_ids)
    for i, (prompt, completion) in enumerate(sequences):
        row = prompt + completion
        input_ids[i, :len(row)] = torch.as_tensor(row)
        labels[i, len(prompt):len(row)] = torch.as_tensor(completion, dtype=torch.long)
        attention_mask[i, :len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "advantages": advantages.float()}


def split_rows(batch: Batch, rows_per_micro_batch: int) -> list[Batch]:
    """Micro-batches of ``rows_per_micro_batch`` rows, each cut to its own longest row."""
    pieces = []
    for start in range(0, batch["input_ids"].shape[0], rows_per_micro_batch):
        piece = {k: v[start:start + rows_per_micro_batch] for k, v in batch.items()}
        width = int(piece["attention_mask"].sum(-1).max())
        pieces.append({k: v[:, :width] if v.ndim == 2 else v for k, v in piece.items()})
    return pieces


class Grpo:
    """The GRPO objective of a run: rollouts, rewards and the clipped policy-gradient update."""

    def __init__(self, rl: RlConfig, rewards: WeightedRewards, rollout: Rollout, tokenizer, *,
                 reference: torch.nn.Module | None, seed: int, rows_per_micro_batch: int):
        self.rl, self.rewards, self.rollout, self.tokenizer = rl, rewards, rollout, tokenizer
        self.reference, self.seed, self.rows_per_micro_batch = reference, seed, rows_per_micro_batch

    def step(self, strategy: Strategy, micro_batches: list[Batch], device: torch.device, *,
             step: int) -> GrpoStepResult:
        """Collective: sample, score and update ``rl.epochs`` times on this rank's prompts of ``step``."""
        rl, rank = self.rl, dist.get_rank() if dist.is_initialized() else 0
        started = time.perf_counter()
        prompts = prompts_of(micro_batches, self.tokenizer)
        completions = self.rollout.sample(prompts.prompt_ids, num_samples=rl.group_size,
                                          seed=rollout_seed(self.seed, step, rank))
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        scores = self.rewards.score([row["prompt"] for row in prompts.rows for _ in range(rl.group_size)], texts,
                                    [row for row in prompts.rows for _ in range(rl.group_size)])
        grouped = pg.group_advantages(torch.tensor(scores.total, dtype=torch.float64), rl.group_size,
                                      scale=rl.scale_rewards)
        rows = training_rows(prompts.prompt_ids, completions, grouped.advantages, group_size=rl.group_size,
                             pad_id=self.tokenizer.pad_token_id)
        batches = split_rows(rows, self.rows_per_micro_batch)
        self.add_fixed_log_probs(strategy, batches, device)
        rollout_s = time.perf_counter() - started

        started = time.perf_counter()
        units = sum(pg.count_units(pg.completion_mask(b["labels"]), rl.loss_average) for b in batches)
        global_units = float(collectives.all_reduce(torch.as_tensor(units, dtype=torch.float64, device=device)))
        for _ in range(rl.epochs):
            totals, grad_norm = accumulate(strategy, batches, device, self.micro_loss, global_count=global_units)
        optimize_s = time.perf_counter() - started
        return self.result(collectives.all_reduce(totals).tolist(), scores, grouped, rows, global_units,
                           grad_norm=grad_norm, rollout_s=rollout_s, optimize_s=optimize_s, device=device)

    def evaluate(self, strategy: Strategy, batches: list[Batch], device: torch.device) -> dict[str, float]:
        """Collective: the mean reward of greedy completions of every rank's eval prompts (each reward's too),
        beside the loss of the reference answers. One ``generate`` per eval batch, the same count on every rank."""
        figures = {"eval_loss": sft.evaluate(strategy, batches, device)}
        texts, prompts = [], PromptBatch([], [], [])
        for batch in batches:
            mine = prompts_of([batch], self.tokenizer)
            texts += self.tokenizer.batch_decode(self.rollout.greedy(mine.prompt_ids), skip_special_tokens=True)
            prompts = PromptBatch(prompts.prompt_ids + mine.prompt_ids, prompts.rows + mine.rows,
                                  prompts.real + mine.real)
        counted = [i for i, real in enumerate(prompts.real) if real]
        scores = self.rewards.score([prompts.rows[i]["prompt"] for i in counted], [texts[i] for i in counted],
                                    [prompts.rows[i] for i in counted])
        names = list(scores.per_reward)
        local = [len(counted), sum(scores.total), *(sum(scores.per_reward[name]) for name in names)]
        count, total, *per_reward = collectives.all_reduce(torch.tensor(local, dtype=torch.float64,
                                                                        device=device)).tolist()
        figures["eval_reward"] = total / max(count, 1.0)
        if len(names) > 1:
            figures |= {f"eval_reward_{metric_name(n)}": v / max(count, 1.0)
                        for n, v in zip(names, per_reward, strict=True)}
        return figures

    @torch.no_grad()
    def add_fixed_log_probs(self, strategy: Strategy, batches: list[Batch], device: torch.device) -> None:
        """The reference's per-token log-probabilities (with a KL term) and, for more than one update, the
        sampling policy's; both fixed for the step's updates."""
        if self.rl.kl_coef:
            for batch in batches:
                batch["ref_logp"] = self.reference_log_probs(strategy, batch, device).cpu()
        if self.rl.epochs > 1:
            model = strategy.model
            model.eval()
            for batch in batches:
                batch["old_logp"] = self.log_probs(model, on_device(batch, device))[0].cpu()

    def reference_log_probs(self, strategy: Strategy, batch: Batch, device: torch.device) -> torch.Tensor:
        if self.reference is not None:
            return self.log_probs(self.reference, on_device(batch, device))[0]
        policy = strategy.unwrapped
        was_training = policy.training
        policy.eval()
        with policy.disable_adapter():
            logp = self.log_probs(policy, on_device(batch, device))[0]
        policy.train(was_training)
        return logp

    def log_probs(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, T-1] log-probabilities of the taken tokens at the sampling temperature, the logits)."""
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        logits = attention.forward(model, inputs).logits
        logits = logits / self.rl.temperature if self.rl.temperature != 1.0 else logits
        return pg.token_log_probs(logits, batch["input_ids"]), logits

    def micro_loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(the clipped surrogate's sum over this micro-batch's units, float64 [tokens, clipped, kl, ratio,
        entropy sums])."""
        rl = self.rl
        logp, logits = self.log_probs(model, batch)
        mask = pg.completion_mask(batch["labels"])
        kl = pg.kl_penalty(logp, batch["ref_logp"], rl.kl_estimator) if rl.kl_coef else None
        loss = pg.clipped_policy_loss(
            logp, batch.get("old_logp", logp.detach()), batch["advantages"], mask, clip_eps=rl.clip_eps,
            clip_eps_high=rl.clip_eps_high, kl=kl, kl_coef=rl.kl_coef, average=rl.loss_average, num_units=1.0,
        )
        entropy = pg.entropy_from_logits(logits[:, :-1], mask) * mask.sum()
        return loss.loss, torch.cat([loss.sums(), entropy.double().view(1)])

    def result(self, totals: list[float], scores, grouped: pg.GroupAdvantages, rows: Batch, global_units: float, *,
               grad_norm: float | None, rollout_s: float, optimize_s: float,
               device: torch.device) -> GrpoStepResult:
        """Collective: the step's loss and figures over every rank's completions."""
        loss_sum, *policy_sums, entropy_sum = totals
        flat_groups = float(grouped.zero_std_fraction) * len(grouped.group_std)
        rollouts = RolloutFigures.reduce(scores, rows, device, flat_groups, len(grouped.group_std))
        flat_groups, groups = rollouts.extra
        figures = {**rollouts.figures, **pg.policy_metrics(policy_sums),
                   "entropy": entropy_sum / max(policy_sums[0], 1.0), "zero_std_groups": flat_groups / max(groups, 1.0),
                   "rollout_s": rollout_s, "optimize_s": optimize_s}
        return GrpoStepResult(loss=loss_sum / max(global_units, 1.0), num_tokens=rollouts.completion_tokens,
                              num_input_tokens=rollouts.input_tokens, grad_norm=grad_norm, figures=figures)


@dataclass(frozen=True)
class RolloutFigures:
    """What every online-RL step reports of its rollouts, over every rank's completions."""

    figures: dict[str, float]  # reward_mean, reward_std, reward_<function> of each reward, completion_len
    completion_tokens: int
    input_tokens: int
    extra: list[float]  # the caller's sums, all-reduced with the rest

    @classmethod
    def reduce(cls, scores, rows: Batch, device: torch.device, *extra: float) -> RolloutFigures:
        """Collective: one all-reduce of this rank's rewards, token counts and ``extra`` sums."""
        names = list(scores.per_reward)
        local = [len(scores.total), sum(scores.total), sum(s * s for s in scores.total),
                 float((rows["labels"][:, 1:] != IGNORE_INDEX).sum()), float(rows["attention_mask"].sum()),
                 *(sum(scores.per_reward[name]) for name in names), *extra]
        (count, total, squares, completion_tokens, input_tokens, *rest) = collectives.all_reduce(
            torch.tensor(local, dtype=torch.float64, device=device)).tolist()
        per_reward, extra = rest[:len(names)], rest[len(names):]
        mean = total / count
        figures = {
            "reward_mean": mean, "reward_std": float(np.sqrt(max(squares / count - mean * mean, 0.0))),
            **{f"reward_{metric_name(name)}": value / count for name, value in zip(names, per_reward, strict=True)},
            "completion_len": completion_tokens / count,
        }
        return cls(figures, int(completion_tokens), int(input_tokens), extra)


def metric_name(reward_name: str) -> str:
    """A reward's key in the metrics: its function's name (``pkg.mod:score`` -> ``score``)."""
    return reward_name.rsplit(":", 1)[-1]

