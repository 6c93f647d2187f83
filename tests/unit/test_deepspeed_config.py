"""The DeepSpeed config generated from a plan, override merging, and the compatibility rules."""

from __future__ import annotations

import pytest

from tunefleet.strategies.base import StrategyPlan
from tunefleet.strategies.compat import check_compatibility
from tunefleet.strategies.deepspeed import deepspeed_config, merge_overrides
from tunefleet.strategies.fsdp import mesh_layout


def _plan(**changes) -> StrategyPlan:
    fields = dict(name="deepspeed_zero3", world_size=4, num_nodes=2, workers_per_node=2,
                  micro_batch_size=2, grad_accum_steps=3, max_grad_norm=1.0)
    return StrategyPlan(**{**fields, **changes})


def test_config_follows_the_plan():
    config = deepspeed_config(_plan(mixed_precision="bf16"))
    assert config["train_micro_batch_size_per_gpu"] == 2
    assert config["gradient_accumulation_steps"] == 3
    assert config["train_batch_size"] == 2 * 3 * 4
    assert config["gradient_clipping"] == 1.0
    assert config["bf16"] == {"enabled": True}
    assert config["fp16"] == {"enabled": False}
    assert config["zero_optimization"] == {"stage": 3}
    assert config["managed_gradient_accumulation"] is True


@pytest.mark.parametrize(("name", "stage"), [("deepspeed_zero2", 2), ("deepspeed_zero3", 3)])
def test_stage_follows_the_strategy_name(name, stage):
    assert deepspeed_config(_plan(name=name))["zero_optimization"]["stage"] == stage


def test_no_clipping_is_zero():
    assert deepspeed_config(_plan(max_grad_norm=None))["gradient_clipping"] == 0.0


def test_fp16_section():
    config = deepspeed_config(_plan(mixed_precision="fp16"))
    assert config["fp16"] == {"enabled": True} and config["bf16"] == {"enabled": False}


def test_cpu_offload_moves_optimizer_for_zero2_and_parameters_for_zero3():
    zero2 = deepspeed_config(_plan(name="deepspeed_zero2", cpu_offload=True))["zero_optimization"]
    zero3 = deepspeed_config(_plan(cpu_offload=True))["zero_optimization"]
    assert zero2["offload_optimizer"]["device"] == "cpu" and "offload_param" not in zero2
    assert zero3["offload_optimizer"]["device"] == "cpu" and zero3["offload_param"]["device"] == "cpu"
    assert zero3["offload_param"]["pin_memory"] is False  # pinning needs CUDA


def test_overrides_merge_key_by_key():
    overrides = {"zero_optimization": {"stage3_param_persistence_threshold": 0}, "steps_per_print": 10}
    config = deepspeed_config(_plan(deepspeed_overrides=overrides))
    assert config["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 0}
    assert config["steps_per_print"] == 10


def test_override_equal_to_the_recipe_is_fine():
    overrides = {"gradient_accumulation_steps": 3, "zero_optimization": {"stage": 3}}
    assert deepspeed_config(_plan(deepspeed_overrides=overrides))["gradient_accumulation_steps"] == 3


@pytest.mark.parametrize(
    ("overrides", "key", "recipe_key"),
    [
        ({"gradient_accumulation_steps": 8}, "gradient_accumulation_steps", "train.grad_accum_steps"),
        ({"train_micro_batch_size_per_gpu": 1}, "train_micro_batch_size_per_gpu", "train.micro_batch_size"),
        ({"gradient_clipping": 0.5}, "gradient_clipping", "train.max_grad_norm"),
        ({"bf16": {"enabled": True}}, "bf16.enabled", "parallelism.mixed_precision"),
        ({"bf16": True}, "bf16.enabled", "parallelism.mixed_precision"),
        ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage", "parallelism.strategy"),
        ({"zero_optimization": 3}, "zero_optimization.stage", "parallelism.strategy"),
        ({"managed_gradient_accumulation": False}, "managed_gradient_accumulation", "training loop"),
    ],
)
def test_override_of_a_recipe_value_names_both_keys(overrides, key, recipe_key):
    with pytest.raises(ValueError, match=key) as raised:
        deepspeed_config(_plan(deepspeed_overrides=overrides))
    assert recipe_key in str(raised.value)


def test_offload_device_is_decided_only_when_the_recipe_offloads():
    nvme = {"zero_optimization": {"offload_optimizer": {"device": "nvme", "nvme_path": "/nvme"}}}
    zero = deepspeed_config(_plan(deepspeed_overrides=nvme))["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "nvme"
    with pytest.raises(ValueError, match="parallelism.cpu_offload"):
        deepspeed_config(_plan(cpu_offload=True, deepspeed_overrides=nvme))


def test_merge_does_not_mutate_its_inputs():
    config, overrides = {"a": {"b": 1}}, {"a": {"c": 2}}
    assert merge_overrides(config, overrides) == {"a": {"b": 1, "c": 2}}
    assert config == {"a": {"b": 1}} and overrides == {"a": {"c": 2}}


@pytest.mark.parametrize(
    ("changes", "shape", "names"),
    [
        ({}, (4,), ("shard",)),
        ({"hsdp": True}, (2, 2), ("replicate", "shard")),
        ({"hsdp": True, "num_nodes": 1, "world_size": 2}, (2,), ("shard",)),
    ],
)
def test_fsdp_mesh_layout(changes, shape, names):
    assert mesh_layout(_plan(name="fsdp", **changes)) == (shape, names)


# ----------------------------------------------------------------------------- compatibility
def _problems(strategy, method="full", *, use_gpu=False, cpu_offload=False, mixed_precision="no"):
    return check_compatibility(strategy, method, use_gpu=use_gpu, cpu_offload=cpu_offload,
                               mixed_precision=mixed_precision)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"])
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_everything_checked_on_cpu_is_allowed(strategy, method):
    assert _problems(strategy, method, mixed_precision="bf16", cpu_offload=strategy != "ddp") == []


def test_ddp_cannot_offload():
    (problem,) = _problems("ddp", cpu_offload=True, use_gpu=True)
    assert "parallelism.cpu_offload" in problem and "fsdp" in problem


def test_fsdp_fp16_is_rejected_with_alternatives():
    (problem,) = _problems("fsdp", use_gpu=True, mixed_precision="fp16")
    assert "parallelism.mixed_precision" in problem and "bf16" in problem and "deepspeed_zero3" in problem
    assert _problems("deepspeed_zero3", use_gpu=True, mixed_precision="fp16") == []


def test_qlora_with_fsdp_on_gpu_is_rejected():
    (problem,) = _problems("fsdp", "qlora", use_gpu=True)
    assert "method.kind" in problem and "strategy" in problem and "deepspeed_zero2" in problem
    assert _problems("deepspeed_zero3", "qlora", use_gpu=True) == []
    assert _problems("fsdp", "lora", use_gpu=True) == []
