"""The objective a run trains and evaluates with, chosen from the model's task and the method's objective."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tunefleet.launcher.config import MethodConfig, ModelConfig
from tunefleet.launcher.objectives import dpo, reward, sft
from tunefleet.launcher.objectives.step import Batch, StepResult
from tunefleet.strategies.base import Strategy

# One optimizer step over this rank's micro-batches (collective).
StepFn = Callable[[Strategy, list[Batch], torch.device], StepResult]
# The objective's figures over every rank's eval batches, keyed as in metrics.jsonl (collective).
EvaluateFn = Callable[[Strategy, list[Batch], torch.device], dict[str, float]]


@dataclass(frozen=True)
class Objective:
    step: StepFn
    evaluate: EvaluateFn


def objective(model: ModelConfig, method: MethodConfig, model_path: str, device: torch.device) -> Objective:
    """The token loss; the classifier loss with accuracy and macro F1; a reward model's pairwise loss with
    reward accuracy; or DPO against a frozen reference (LoRA: the policy with adapters disabled; full: a copy
    of the starting weights from ``model_path``)."""
    if method.objective == "reward":
        return Objective(reward.reward_step, reward.reward_evaluate)
    if model.task == "sequence_classification":
        labels = model.num_labels
        return Objective(sft.train_step, lambda strategy, batches, device: sft.evaluate_classifier(
            strategy, batches, device, labels))
    if method.objective != "dpo":
        return Objective(sft.train_step, lambda strategy, batches, device: {
            "eval_loss": sft.evaluate(strategy, batches, device)})
    reference, beta = dpo.load_reference(model, method, model_path, device), method.beta
    return Objective(
        lambda strategy, batches, device: dpo.dpo_step(strategy, reference, batches, device, beta=beta),
        lambda strategy, batches, device: dpo.dpo_evaluate(strategy, reference, batches, device, beta=beta),
    )
