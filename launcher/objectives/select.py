"""The objective a run trains and evaluates with, chosen from the model's task and the method's objective."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tunefleet.launcher.config import Recipe, RlConfig
from tunefleet.launcher.objectives import dpo, grpo, ppo, reward, sft
from tunefleet.launcher.objectives.rl_rewards import RewardSpec, WeightedRewards
from tunefleet.launcher.objectives.rollout import ColocatedRollout
from tunefleet.launcher.objectives.step import Batch, StepResult
from tunefleet.strategies.base import Strategy

# One train step over this rank's micro-batches of the step (collective); online RL seeds its sampling by it.
StepFn = Callable[[Strategy, list[Batch], torch.device, int], StepResult]
# The objective's figures over every rank's eval batches, keyed as in metrics.jsonl (collective).
EvaluateFn = Callable[[Strategy, list[Batch], torch.device], dict[str, float]]


@dataclass(frozen=True)
class Objective:
    step: StepFn
    evaluate: EvaluateFn


def objective(recipe: Recipe, model_path: str, device: torch.device, *, strategy: Strategy, tokenizer,
              rows_per_micro_batch: int) -> Objective:
    """The token loss; the classifier loss with accuracy and macro F1; a reward model's pairwise loss with
    reward accuracy; DPO against a frozen reference (LoRA: the policy with adapters disabled; full: a copy
    of the starting weights from ``model_path``); or GRPO with colocated rollouts and the recipe's rewards
    (evaluated by the reward of greedy completions and the loss of the reference answers)."""
    model, method = recipe.model, recipe.method
    if method.objective == "reward":
        return Objective(_stepless(reward.reward_step), reward.reward_evaluate)
    if model.task == "sequence_classification":
        labels = model.num_labels
        return Objective(_stepless(sft.train_step), lambda strategy, batches, device: sft.evaluate_classifier(
            strategy, batches, device, labels))
    token_loss = lambda strategy, batches, device: {"eval_loss": sft.evaluate(strategy, batches, device)}  # noqa: E731
    if method.online_rl:
        online = make_online_rl(recipe, model_path, device, strategy=strategy, tokenizer=tokenizer,
                                rows_per_micro_batch=rows_per_micro_batch)
        return Objective(lambda strategy, batches, device, step: online.step(strategy, batches, device, step=step),
                         online.evaluate)
    if method.objective != "dpo":
        return Objective(_stepless(sft.train_step), token_loss)
    reference, beta = dpo.load_reference(model, method, model_path, device), method.beta
    return Objective(
        lambda strategy, batches, device, step: dpo.dpo_step(strategy, reference, batches, device, beta=beta),
        lambda strategy, batches, device: dpo.dpo_evaluate(strategy, reference, batches, device, beta=beta),
    )


def make_online_rl(recipe: Recipe, model_path: str, device: torch.device, *, strategy: Strategy, tokenizer,
                   rows_per_micro_batch: int) -> grpo.Grpo:
    """GRPO or PPO with the recipe's rewards (loaded here, on every worker), rollouts on this worker, and the
    frozen reference its KL needs (none without a KL term; the adapter-disabled base for adapters)."""
    rl = recipe.method.rl
    rollout = ColocatedRollout(strategy, tokenizer, max_new_tokens=rl.max_new_tokens, temperature=rl.temperature,
                               top_p=rl.top_p, batch_size=rows_per_micro_batch, device=device)
    reference = dpo.load_reference(recipe.model, recipe.method, model_path, device) if rl.kl_coef else None
    rewards = WeightedRewards.from_specs(reward_specs(rl), device=device)
    kind = ppo.Ppo if recipe.method.objective == "ppo" else grpo.Grpo
    return kind(rl, rewards, rollout, tokenizer, reference=reference, seed=recipe.train.seed,
                rows_per_micro_batch=rows_per_micro_batch)


def reward_specs(rl: RlConfig) -> list[RewardSpec]:
    return [RewardSpec(entry.function, entry.weight, entry.options, entry.name, entry.model) for entry in rl.reward]


def _stepless(step_fn: Callable[[Strategy, list[Batch], torch.device], StepResult]) -> StepFn:
    """A step that does not depend on the step's number."""
    return lambda strategy, batches, device, step: step_fn(strategy, batches, device)
