"""Reward modelling in one process (no process group): the pairwise loss on known
scores, its normalization over micro-batches, and the recipe rules for it."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import REPO
from tests.unit.test_steps import FixedLogits
from tunefleet.launcher.config import load_recipe
from tunefleet.launcher.errors import RecipeError
from tunefleet.launcher.objectives import reward

RECIPE = REPO / "recipes" / "tiny" / "llama-reward-ddp.yaml"
CPU = torch.device("cpu")


def _labels(num_rows: int, padding_pairs: tuple[int, ...] = ()) -> torch.Tensor:
    """Token labels of ``num_rows`` rows (chosen rows, then rejected); padding pairs have no target."""
    labels = torch.tensor([[-100, 5]] * num_rows)
    for pair in padding_pairs:
        labels[pair] = labels[pair + num_rows // 2] = -100
    return labels


def test_pairwise_loss_and_statistics_on_known_scores():
    # Pairs: (2, 0) won by 2, (0, 1) lost by 1, and a padding pair that counts nowhere.
    rewards = torch.tensor([2.0, 0.0, 9.0, 0.0, 1.0, -9.0])
    loss, stats = reward.pair_statistics(rewards, {"labels": _labels(6, padding_pairs=(2,))})
    expected = -math.log(1 / (1 + math.exp(-2.0))) - math.log(1 / (1 + math.exp(1.0)))
    assert float(loss) == pytest.approx(expected)
    assert stats.tolist() == pytest.approx([2.0, 1.0, 1.0, 2.0, 1.0])  # pairs, correct, margin, chosen, rejected


class ScoreHead(torch.nn.Module):
    """A one-output "reward model": a learned weight times each row's first token id."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, input_ids, **_):
        return SimpleNamespace(logits=(self.weight * input_ids[:, :1].float()))


class OneProcess:
    def __init__(self, model):
        self.model = self.unwrapped = model
        self.steps = 0

    def no_sync(self, enabled):
        import contextlib

        return contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()

    def optimizer_step(self):
        self.steps += 1
        return None


def _pairs(chosen: list[int], rejected: list[int]) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[t, 7] for t in chosen + rejected])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": _labels(len(ids))}


def test_the_step_gradient_is_that_of_the_mean_over_all_pairs_whatever_the_micro_batches():
    chosen, rejected = [3, 1, 4, 2], [1, 2, 2, 5]
    grads = []
    for split in ((0, 4), (0, 1, 4), (0, 1, 2, 3, 4)):
        bounds = zip(split[:-1], split[1:], strict=True)
        model, batches = ScoreHead(), [_pairs(chosen[a:b], rejected[a:b]) for a, b in bounds]
        result = reward.reward_step(OneProcess(model), batches, CPU)
        grads.append(float(model.weight.grad))
        margins = torch.tensor(chosen, dtype=torch.float) - torch.tensor(rejected, dtype=torch.float)
        assert result.loss == pytest.approx(float(-torch.nn.functional.logsigmoid(0.5 * margins).mean()))
        assert result.num_pairs == 4 and result.reward_accuracy == 0.5
    w = torch.tensor(0.5, requires_grad=True)
    (-torch.nn.functional.logsigmoid(w * margins).mean()).backward()
    assert grads == pytest.approx([float(w.grad)] * 3)


def test_evaluation_reports_reward_accuracy_over_real_pairs():
    scores = torch.tensor([[1.0], [3.0], [0.0], [2.0]])  # pairs (1, 0) won, (3, 2) won
    batch = {"input_ids": torch.zeros(4, 2, dtype=torch.long), "attention_mask": torch.ones(4, 2, dtype=torch.long),
             "labels": _labels(4)}
    result = reward.reward_evaluate(SimpleNamespace(model=FixedLogits(scores)), [batch], CPU)
    assert result["eval_reward_accuracy"] == 1.0 and result["eval_reward_margin"] == pytest.approx(1.0)


@pytest.mark.parametrize(("override", "key"), [
    ("model.num_labels=2", "model.num_labels: a reward model gives one score"),
    ("model.task=causal_lm", "model.task: method.objective reward trains a one-score head"),
    ("method.objective=sft", "model.num_labels: 1 is a reward model's single score"),
])
def test_reward_recipes_need_a_one_score_classifier(override, key):
    assert load_recipe(RECIPE).method.objective == "reward"
    with pytest.raises(RecipeError, match=key):
        load_recipe(RECIPE, [override])
