"""PPO on one process: the value head (attached, trained, checkpointed with the model, left out of exports),
one update on fixed rollouts, and the figures it reports. Multi-rank agreement is in tests/dist/test_grpo.py."""

from __future__ import annotations

import pytest
import torch

from tunefleet.launcher.config import MethodConfig, ModelConfig, RlConfig, TrainConfig
from tunefleet.launcher.model import modeling, value_head
from tunefleet.launcher.objectives import ppo
from tunefleet.launcher.objectives import value as value_math
from tunefleet.launcher.objectives.rl_rewards import RewardSpec, WeightedRewards

from .test_grpo import FixedRollout, Ids, Plain, prompt_batch, says_seven, tiny_policy

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("ppo-model")
    tiny_policy().save_pretrained(folder)
    return str(folder)


def test_the_value_head_reads_the_last_hidden_state_and_starts_at_zero():
    model = tiny_policy()
    head = value_head.attach(model)
    with pytest.raises(RuntimeError, match="no forward ran"):
        value_head.values(head)
    ids = torch.tensor([[3, 4, 5], [6, 7, 8]])
    out = model(ids, output_hidden_states=True)
    values = value_head.values(head)
    assert values.shape == (2, 3) and values.dtype == torch.float32 and torch.count_nonzero(values) == 0
    with torch.no_grad():
        head.weight.normal_()
    model(ids)
    # The last hidden state after the final norm: what the language-model head reads.
    expected = out.hidden_states[-1] @ head.weight + head.bias
    torch.testing.assert_close(value_head.values(head), expected)


def test_loaded_with_adapters_the_value_head_trains_and_takes_head_lr(model_dir):
    method = MethodConfig(kind="lora", objective="ppo", rl={"group_size": 1})
    model = modeling.load_model(ModelConfig(path=model_dir), method, model_dir, with_value_head=True)
    head = value_head.find(model)
    assert head.weight.requires_grad and head.bias.requires_grad
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in name for name in trainable) and all(
        "lora_" in name or value_head.is_value_head_key(name) for name in trainable)
    groups = modeling.param_groups(model, TrainConfig(max_steps=1, lr=1e-4, head_lr=1e-2))
    head_params = {id(head.weight), id(head.bias)}
    assert {g["lr"] for g in groups if head_params & {id(p) for p in g["params"]}} == {1e-2}


def test_the_final_model_leaves_the_value_head_out(model_dir, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from tunefleet.launcher.model.modeling import load_tokenizer
    from tunefleet.launcher.model.tiny import build_tokenizer

    model = modeling.load_model(ModelConfig(path=model_dir), MethodConfig(objective="ppo"), model_dir,
                                with_value_head=True)
    state = model.state_dict()
    assert {"value_head.weight", "value_head.bias"} <= set(state)
    build_tokenizer(["a b c"], vocab_size=16).save_pretrained(model_dir)
    modeling.save_final(model, state, load_tokenizer(model_dir), tmp_path / "final")
    with safe_open(str(tmp_path / "final" / "model.safetensors"), "pt") as saved:
        assert not any(value_head.is_value_head_key(key) for key in saved.keys())  # noqa: SIM118 (not iterable)
    _, loading = AutoModelForCausalLM.from_pretrained(tmp_path / "final", output_loading_info=True)
    assert not any(loading.values())  # no missing, unexpected or mismatched weights


def rewarded(lr: float = 0.5, **rl) -> tuple[ppo.Ppo, Plain, torch.nn.Module]:
    model = tiny_policy()
    value_head.attach(model)
    rewards = WeightedRewards.from_specs([RewardSpec(f"{says_seven.__module__}:says_seven")])
    objective = ppo.Ppo(RlConfig(**{"group_size": 2, "kl_coef": 0.0, "max_new_tokens": 2, **rl}), rewards,
                        FixedRollout(), Ids(), reference=None, seed=0, rows_per_micro_batch=2)
    return objective, Plain(model, lr=lr), model


def test_one_update_raises_the_rewarded_completion_and_fits_the_values():
    # gamma = lambda = 1: every return is the score. Plain SGD has no clipping: a small step.
    objective, strategy, model = rewarded(lr=0.1, epochs=2, lam=1.0, vf_coef=1.0)
    prompts = [prompt_batch([([5, 6], [7]), ([9], [7])])]

    def p_seven():
        with torch.no_grad():
            return float(model(torch.tensor([[5, 6]])).logits[0, -1].softmax(-1)[7])

    before = p_seven()
    first = objective.step(strategy, prompts, CPU, step=0).metrics()
    assert p_seven() > before
    assert first["reward_mean"] == 0.5 and first["completion_len"] == 2.0
    # Values start at 0: they explain nothing yet.
    assert first["explained_variance"] == pytest.approx(0.0, abs=1e-6)
    assert first["return_mean"] == pytest.approx(0.5) and first["value_loss"] > 0
    # The head learnt the returns: after the rewarded token the value is higher than after the other one.
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7], [5, 6, 8]]))
    after_seven, after_eight = value_head.values(value_head.find(model))[:, -1].tolist()
    assert objective.step(strategy, prompts, CPU, step=1).metrics()["explained_variance"] > 0
    assert after_seven > after_eight


def test_the_kl_penalty_lowers_the_returns():
    """With a reference that disagrees with the policy, every token's reward carries -kl_coef * kl."""
    reference = tiny_policy()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p))
    prompts = [prompt_batch([([5, 6], [7])])]
    base, strategy, _ = rewarded()
    without = base.step(strategy, prompts, CPU, step=0).metrics()
    objective, strategy, _ = rewarded(kl_coef=0.5, kl_estimator="k3")
    objective.reference = reference
    penalized = objective.step(strategy, prompts, CPU, step=0).metrics()
    assert penalized["kl"] > 0 and without["kl"] == 0
    assert penalized["return_mean"] < without["return_mean"]


def test_explained_variance_of_the_summed_figures_matches_the_tensor_formula():
    gen = torch.Generator().manual_seed(0)
    returns, values = torch.randn(3, 6, generator=gen), torch.randn(3, 6, generator=gen)
    mask = (torch.rand(3, 6, generator=gen) > 0.3).float()
    batches = [{"returns": returns[:2], "old_values": values[:2]}, {"returns": returns[2:], "old_values": values[2:]}]
    figures = ppo.return_figures(ppo.return_sums(batches, [mask[:2], mask[2:]]))
    expected = value_math.explained_variance(values, returns, mask)
    assert figures["explained_variance"] == pytest.approx(float(expected), rel=1e-5)
    assert figures["return_mean"] == pytest.approx(float(returns[mask > 0].mean()), rel=1e-5)
    assert ppo.return_figures([4, 8.0, 16.0, 0.0, 1.0])["explained_variance"] == 0.0  # constant returns

