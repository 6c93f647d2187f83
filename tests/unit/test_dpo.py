"""DPO on one CPU process without a process group: the loss and rewards on known
numbers, the reference for LoRA and full fine-tuning, and preference accuracy
rising on the shipped synthetic preference set."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from transformers import AutoTokenizer

from tests.conftest import REPO
from tunefleet.launcher.config import load_recipe
from tunefleet.launcher.data import batches, preprocess
from tunefleet.launcher.model import modeling
from tunefleet.launcher.objectives import dpo

RECIPE = REPO / "recipes" / "tiny" / "llama-dpo-ddp.yaml"
CPU = torch.device("cpu")


class LocalStrategy:
    """What the step functions use of a strategy, for one process: AdamW, clipping at 1."""

    def __init__(self, model: torch.nn.Module, lr: float):
        self.model = self.unwrapped = model
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    def no_sync(self, enabled: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def optimizer_step(self) -> float:
        norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm


@pytest.fixture(autouse=True)
def one_thread():
    """Two busy cores shared with other tests: one intra-op thread is much faster than two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    recipe = load_recipe(RECIPE, [f"data.cache_dir={tmp_path_factory.mktemp('cache')}"])
    model_path = modeling.resolve_model_path(recipe.model)
    folder = preprocess.prepare(recipe.data, AutoTokenizer.from_pretrained(model_path), model_path, seed=0)
    return recipe, model_path, batches.open_split(folder, "train"), batches.open_split(folder, "eval")


def test_loss_rewards_and_accuracy_on_known_log_probabilities():
    policy, reference = torch.tensor([-1.0, -2.0, -3.0, -1.0]), torch.tensor([-2.0, -2.0, -2.0, -2.0])
    labels = torch.tensor([[0, 5], [0, 6], [0, 7], [0, -100]])  # the second pair's rejected row has no target
    loss, stats = dpo.pair_statistics(policy, reference, {"labels": labels}, beta=0.5)
    # Pair 0: r_chosen = 0.5 * (-1 + 2) = 0.5, r_rejected = 0.5 * (-3 + 2) = -0.5.
    assert float(loss) == pytest.approx(-math.log(1 / (1 + math.exp(-1.0))))
    assert stats.tolist() == pytest.approx([1.0, 1.0, 1.0, 0.5, -0.5])


def test_a_lora_reference_is_the_policy_with_adapters_disabled(prepared):
    recipe, model_path, train, _ = prepared
    lora = recipe.method.model_copy(update={"kind": "lora"})
    policy = modeling.load_model(recipe.model, lora, model_path)
    assert dpo.load_reference(recipe.model, lora, model_path, CPU) is None
    strategy = LocalStrategy(policy, lr=1e-2)
    micro = batches.rank_micro_batches(train, 0, rank=0, world_size=1, micro_batch_size=4, grad_accum_steps=1,
                                      seed=0, pad_id=0)
    before = dpo.reference_logps(strategy, None, micro[0])
    first = dpo.dpo_step(strategy, None, micro, CPU, beta=0.1)
    assert first.loss == pytest.approx(math.log(2), rel=1e-6) and first.num_pairs == 4  # LoRA starts as the base
    dpo.dpo_step(strategy, None, micro, CPU, beta=0.1)
    torch.testing.assert_close(dpo.reference_logps(strategy, None, micro[0]), before)
    assert not torch.allclose(dpo.sequence_logps(policy, micro[0]), before) and policy.training


def test_preference_accuracy_rises_on_the_shipped_pairs(prepared):
    recipe, model_path, train, evaluation = prepared
    torch.manual_seed(0)
    policy = modeling.load_model(recipe.model, recipe.method, model_path)
    reference = dpo.load_reference(recipe.model, recipe.method, model_path, CPU)
    strategy = LocalStrategy(policy, lr=3e-3)
    held_out = batches.eval_batches(evaluation, rank=0, world_size=1, batch_size=25, max_rows=100, pad_id=0)
    before = dpo.dpo_evaluate(strategy, reference, held_out, CPU, beta=recipe.method.beta)
    accuracy = []
    for step in range(40):
        micro = batches.rank_micro_batches(train, step, rank=0, world_size=1, micro_batch_size=4,
                                          grad_accum_steps=1, seed=0, pad_id=0)
        accuracy.append(dpo.dpo_step(strategy, reference, micro, CPU, beta=recipe.method.beta).reward_accuracy)
    after = dpo.dpo_evaluate(strategy, reference, held_out, CPU, beta=recipe.method.beta)
    assert before["eval_reward_accuracy"] == 0.0 and before["eval_loss"] == pytest.approx(math.log(2))
    assert after["eval_reward_accuracy"] >= 0.65 and after["eval_loss"] < 0.66
    assert after["eval_reward_margin"] > 0.1 and sum(accuracy[-20:]) > sum(accuracy[:20])
