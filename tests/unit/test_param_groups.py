"""Optimizer rates and freezing (launcher/param_groups.py), parameter by parameter, on the tiny Llama."""

from __future__ import annotations

import pytest
import torch

from tunefleet.launcher.config import MethodConfig, ModelConfig, TrainConfig, UnfreezeStep
from tunefleet.launcher.errors import RecipeError
from tunefleet.launcher.model import modeling
from tunefleet.launcher.model.param_groups import apply_unfreeze, matches

LR, DECAY, HEAD_LR = 1e-3, 0.5, 1e-2
NUM_LAYERS = 4  # tiny:llama
SEQ_LEN = 8


@pytest.fixture(scope="module")
def model_dir() -> str:
    return modeling.resolve_model_path(ModelConfig(path="tiny:llama"))


def _load(model_dir: str, **method) -> torch.nn.Module:
    torch.manual_seed(0)
    return modeling.load_model(ModelConfig(path=model_dir), MethodConfig(**method), model_dir)


def _load_classifier(model_dir: str, **method) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(path=model_dir, task="sequence_classification", num_labels=3)
    return modeling.load_model(cfg, MethodConfig(**method), model_dir)


def _effective_lrs(model: torch.nn.Module, train: TrainConfig) -> dict[str, float]:
    """Each parameter's rate as the optimizer sees it (group lr after the scheduler's first step)."""
    optimizer = modeling.make_optimizer_factory(train)(modeling.param_groups(model, train))
    modeling.make_scheduler_factory(train)(optimizer)
    by_id = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    return {name: by_id[id(p)] for name, p in model.named_parameters() if id(p) in by_id}


def _train(model: torch.nn.Module, train: TrainConfig, num_steps: int) -> list[dict]:
    """AdamW steps on random tokens; the weights after each step."""
    optimizer = modeling.make_optimizer_factory(train)(modeling.param_groups(model, train))
    scheduler = modeling.make_scheduler_factory(train)(optimizer)
    gen = torch.Generator().manual_seed(0)
    snapshots = []
    for step in range(num_steps):
        apply_unfreeze(model, step)
        ids = torch.randint(4, 1024, (2, SEQ_LEN), generator=gen)
        logits = model(input_ids=ids, use_cache=False).logits
        logits.float().logsumexp(-1).mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        snapshots.append({name: p.detach().clone() for name, p in model.named_parameters()})
    return snapshots


# --------------------------------------------------------------------------- rates
def test_layer_decay_gives_each_parameter_its_rate(model_dir):
    model = _load(model_dir)
    train = TrainConfig(max_steps=10, lr=LR, lr_layer_decay=DECAY, schedule="constant")
    lrs = _effective_lrs(model, train)
    assert len(lrs) == len(list(model.parameters()))
    for name, lr in lrs.items():
        if name.startswith("model.layers."):
            layer = int(name.split(".")[2])
            want = LR * DECAY ** (NUM_LAYERS - 1 - layer)
        elif name.startswith("model.embed_tokens."):
            want = LR * DECAY**NUM_LAYERS
        else:
            assert name in ("model.norm.weight", "lm_head.weight"), name
            want = LR
        assert lr == pytest.approx(want, rel=1e-12), name


def test_head_lr_applies_to_the_new_classifier_head_only(model_dir):
    model = _load_classifier(model_dir)
    assert model.tunefleet_new_weights == {"score.weight"}
    train = TrainConfig(max_steps=10, lr=LR, head_lr=HEAD_LR, lr_layer_decay=DECAY, schedule="constant")
    lrs = _effective_lrs(model, train)
    assert lrs["score.weight"] == HEAD_LR
    assert lrs["model.norm.weight"] == LR
    assert lrs["model.layers.0.mlp.up_proj.weight"] == pytest.approx(LR * DECAY**3)
    assert lrs["model.embed_tokens.weight"] == pytest.approx(LR * DECAY**4)


def test_head_lr_reaches_the_head_peft_trains_beside_lora(model_dir):
    model = _load_classifier(model_dir, kind="lora")
    lrs = _effective_lrs(model, TrainConfig(max_steps=10, lr=LR, head_lr=HEAD_LR, schedule="constant"))
    heads = {name for name, lr in lrs.items() if lr == HEAD_LR}
    assert heads == {"base_model.model.score.modules_to_save.default.weight"}
    assert all(lr == LR for name, lr in lrs.items() if name not in heads)


def test_head_lr_without_a_new_head_is_an_error(model_dir):
    with pytest.raises(RecipeError, match="train.head_lr"):
        modeling.param_groups(_load(model_dir), TrainConfig(max_steps=2, head_lr=HEAD_LR))


def test_weight_decay_skips_biases_and_norms(model_dir):
    model = _load(model_dir)
    groups = modeling.param_groups(model, TrainConfig(max_steps=2, weight_decay=0.1, lr_layer_decay=DECAY))
    names = {id(p): name for name, p in model.named_parameters()}
    for group in groups:
        for p in group["params"]:
            assert group["weight_decay"] == (0.0 if "norm" in names[id(p)] else 0.1), names[id(p)]


# --------------------------------------------------------------------------- freezing
def test_frozen_parameters_never_change(model_dir):
    model = _load(model_dir, freeze=["model.embed_tokens", "model.layers.[0-1]"])
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {name for name, _ in model.named_parameters()
                      if name.startswith(("model.embed_tokens.", "model.layers.0.", "model.layers.1."))}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    after = _train(model, TrainConfig(max_steps=3, lr=1e-2, weight_decay=0.1, schedule="constant"), 3)[-1]
    for name in before:
        assert torch.equal(after[name], before[name]) == (name in frozen), name


def test_unfreezing_starts_a_group_exactly_at_its_step(model_dir):
    model = _load(model_dir)
    unfreeze_at = {"model.layers.0.": 2, "model.embed_tokens.": 3}
    schedule = [UnfreezeStep(step=2, modules=["model.layers.0"]), UnfreezeStep(step=3, modules=["*embed_tokens"])]
    train = TrainConfig(max_steps=5, lr=1e-2, weight_decay=0.1, schedule="constant", unfreeze_schedule=schedule)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    snapshots = [before, *_train(model, train, 5)]
    for name in before:
        start = next((step for prefix, step in unfreeze_at.items() if name.startswith(prefix)), 0)
        # snapshots[k + 1] is after step k: unchanged through step start - 1, changed by step start.
        assert torch.equal(snapshots[start][name], before[name]), name
        assert not torch.equal(snapshots[start + 1][name], before[name]), name


def test_unfrozen_parameters_start_adam_afresh(model_dir):
    """A group unfrozen at step 2 gets the update a fresh AdamW gives: |first step| = lr per element."""
    model = _load(model_dir)
    schedule = [UnfreezeStep(step=2, modules=["model.norm"])]
    train = TrainConfig(max_steps=4, lr=1e-2, schedule="constant", unfreeze_schedule=schedule)
    snapshots = _train(model, train, 3)
    delta = (snapshots[2]["model.norm.weight"] - snapshots[1]["model.norm.weight"]).abs()
    torch.testing.assert_close(delta, torch.full_like(delta, 1e-2), rtol=1e-3, atol=0)


# --------------------------------------------------------------------------- patterns
def test_patterns_match_modules_and_parameters():
    assert matches("model.layers.1.mlp.up_proj.weight", "model.layers.1")
    assert matches("model.layers.1.mlp.up_proj.weight", "model.layers.[0-1].*")
    assert matches("model.layers.1.mlp.up_proj.weight", "*up_proj.weight")
    assert not matches("model.layers.10.mlp.up_proj.weight", "model.layers.1")


def test_an_unknown_freeze_pattern_names_the_key_and_real_modules(model_dir):
    with pytest.raises(RecipeError) as caught:
        _load(model_dir, freeze=["model.embed_tokens", "encoder.layer.*"])
    problem, = caught.value.problems
    assert problem.where == "method.freeze.1"
    assert "encoder.layer.*" in problem.message
    assert problem.message.endswith("model.embed_tokens, model.layers.0, model.layers.1, model.layers.2, "
                                    "model.layers.3, model.norm, lm_head")


def test_an_unfreeze_pattern_must_match_a_trainable_parameter(model_dir):
    model = _load(model_dir, freeze=["model.layers.0"])
    train = TrainConfig(max_steps=4, unfreeze_schedule=[UnfreezeStep(step=1, modules=["model.layers.0"])])
    with pytest.raises(RecipeError, match=r"train.unfreeze_schedule.0.modules.0"):
        modeling.param_groups(model, train)


def test_recipe_rejects_settings_that_would_do_nothing():
    with pytest.raises(ValueError, match="method.freeze"):
        MethodConfig(kind="lora", freeze=["model.layers.0"])
    with pytest.raises(ValueError, match=r"unfreeze_schedule.0.step"):
        TrainConfig(max_steps=4, unfreeze_schedule=[UnfreezeStep(step=4, modules=["model.layers.0"])])


# --------------------------------------------------------------------------- strategies
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_unfreezing_is_rejected_where_deepspeed_would_still_step_frozen_layers(strategy):
    from tunefleet.strategies.compat import check_compatibility

    problems = check_compatibility(strategy, "full", use_gpu=False, cpu_offload=False, mixed_precision="no",
                                   unfreeze_schedule=True)
    if strategy.startswith("deepspeed"):
        (problem,) = problems
        assert "train.unfreeze_schedule" in problem and "ddp or fsdp" in problem
    else:
        assert problems == []


@pytest.mark.parametrize("method", ["ia3", "prefix_tuning", "prompt_tuning"])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "deepspeed_zero3"])
def test_new_peft_methods_are_allowed_where_they_were_checked(strategy, method):
    from tunefleet.strategies.compat import check_compatibility

    assert check_compatibility(strategy, method, use_gpu=False, cpu_offload=False, mixed_precision="no") == []


def test_the_planner_rejects_unknown_patterns_before_any_worker_starts():
    from tunefleet.launcher.config import Recipe
    from tunefleet.launcher.plan.memory_fit import build_meta_model

    raw = {"name": "x", "output_dir": "/tmp/x", "model": {"path": "tiny:llama"}, "method": {"freeze": ["model.norm"]},
           "data": {"sources": [{"path": "/tmp/x.jsonl", "format": "text"}]},
           "train": {"max_steps": 4, "unfreeze_schedule": [{"step": 1, "modules": ["model.norm"]}]}}
    with pytest.raises(RecipeError) as caught:
        build_meta_model(Recipe.model_validate(raw))
    assert [p.where for p in caught.value.problems] == ["train.unfreeze_schedule.0.modules.0"]
    raw["method"]["freeze"] = ["model.layers.9"]
    with pytest.raises(RecipeError, match="method.freeze.0"):
        build_meta_model(Recipe.model_validate(raw))
