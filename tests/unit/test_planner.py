"""The memory planner (tunefleet.launcher.plan.memory_fit) and its arithmetic (tunefleet.strategies.memory)."""

from __future__ import annotations

import json

import pytest
import transformers
from rich.console import Console

from tunefleet.launcher.cli import render
from tunefleet.launcher.config import Recipe, recipe_from_dict
from tunefleet.launcher.errors import RecipeError, UserError
from tunefleet.launcher.plan import memory_fit
from tunefleet.strategies import memory
from tunefleet.strategies.memory import GiB, ModelShape, TrainingSetup

# Public parameter counts (model cards / safetensors index), per shipped config.
PUBLIC_PARAM_COUNTS = {
    "meta-llama/Llama-3.1-8B": 8.03e9,
    "meta-llama/Llama-3.1-70B": 70.6e9,
    "meta-llama/Llama-3.1-405B": 405.9e9,
    "meta-llama/Llama-3.2-1B": 1.24e9,
    "meta-llama/Llama-3.2-3B": 3.21e9,
    "Qwen/Qwen2.5-7B": 7.62e9,
    "Qwen/Qwen2.5-72B": 72.7e9,
    "mistralai/Mistral-7B-v0.1": 7.24e9,
    "mistralai/Mistral-7B-v0.3": 7.25e9,
    "google/gemma-2-9b": 9.24e9,
}
P = 1_000_000_000


def make_recipe(model_path: str = "tiny:llama", **sections: dict) -> Recipe:
    raw = {
        "name": "plan-test",
        "output_dir": "/tmp/plan-test",
        "model": {"path": model_path},
        "data": {"sources": [{"path": "/tmp/plan-test/train.jsonl"}], "max_seq_len": 2048},
        "train": {"max_steps": 1},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return recipe_from_dict(raw)


def gpu_recipe(model_path: str, **sections: dict) -> Recipe:
    parallelism = {"use_gpu": True, "workers_per_node": 8, "mixed_precision": "bf16", **sections.pop("parallelism", {})}
    return make_recipe(model_path, model={"dtype": "bfloat16"}, parallelism=parallelism, **sections)


def shape(num_params: int = P, num_persistent: int = 0, **overrides) -> ModelShape:
    values = dict(
        num_params=num_params, num_trainable_params=num_params, num_persistent_params=num_persistent,
        num_root_params=0, num_largest_layer_params=0, num_largest_module_params=0,
        num_layers=32, hidden_size=4096, num_heads=32, vocab_size=32000,
    )
    return ModelShape(**{**values, **overrides})


def setup(world_size: int, mixed_precision: str = "bf16", weight_bytes: int = 4, **overrides) -> TrainingSetup:
    values = dict(
        method="full", objective="sft", world_size=world_size, weight_bytes=weight_bytes,
        mixed_precision=mixed_precision,
        seq_len=2048, micro_batch_size=1, activation_checkpointing=False, eager_attention=False, causal_lm=True,
    )
    return TrainingSetup(**{**values, **overrides})


def state_bytes(strategy: str, world_size: int, **setup_options) -> int:
    return memory.estimate(strategy, shape(), setup(world_size, **setup_options)).model_state_bytes


# --------------------------------------------------------------------------- ZeRO paper arithmetic
@pytest.mark.parametrize("strategy", ["deepspeed_zero2", "deepspeed_zero3"])
def test_mixed_precision_adam_is_16_bytes_per_param(strategy):
    assert state_bytes(strategy, world_size=1) == 16 * P


@pytest.mark.parametrize("world_size", [2, 8, 64])
def test_zero3_holds_16p_over_n(world_size):
    assert state_bytes("deepspeed_zero3", world_size) == pytest.approx(16 * P / world_size, abs=1)


@pytest.mark.parametrize("world_size", [2, 8, 64])
def test_zero2_holds_2p_plus_14p_over_n(world_size):
    assert state_bytes("deepspeed_zero2", world_size) == pytest.approx(2 * P + 14 * P / world_size, abs=1)


def test_torch_adamw_in_fp32_is_16_bytes_per_param_without_a_master_copy():
    assert state_bytes("ddp", 8, mixed_precision="no") == 16 * P
    assert state_bytes("fsdp", 8, mixed_precision="no") == 16 * P / 8
    estimate = memory.estimate("ddp", shape(), setup(8, mixed_precision="no"))
    assert (estimate.params_bytes, estimate.grads_bytes, estimate.optimizer_bytes) == (4 * P, 4 * P, 8 * P)


def test_deepspeed_clones_a_master_partition_also_in_fp32():
    assert state_bytes("deepspeed_zero2", 8, mixed_precision="no") == 4 * P + 16 * P / 8
    assert state_bytes("deepspeed_zero3", 8, mixed_precision="no") == 20 * P / 8


def test_zero3_keeps_small_parameters_whole_on_every_rank():
    small = 10_000_000
    with_small = memory.estimate("deepspeed_zero3", shape(num_persistent=small), setup(8))
    assert with_small.model_state_bytes == pytest.approx(16 * P / 8 + 2 * small, abs=1)


def test_cpu_offload_moves_state_to_the_host():
    zero3 = memory.estimate("deepspeed_zero3", shape(), setup(8), cpu_offload=True)
    assert zero3.params_bytes + zero3.grads_bytes + zero3.optimizer_bytes == 0
    assert zero3.offloaded_bytes == pytest.approx((2 + 12 + 4) * P / 8, abs=1)  # + fp32 gradients on the host
    fsdp = memory.estimate("fsdp", shape(), setup(8), cpu_offload=True)
    assert fsdp.offloaded_bytes == pytest.approx(16 * P / 8, abs=1) and fsdp.params_bytes == 0
    with pytest.raises(ValueError, match="ddp"):
        memory.estimate("ddp", shape(), setup(8), cpu_offload=True)


# --------------------------------------------------------------------------- activations, LoRA, QLoRA
def test_activations_follow_korthikanti_and_shrink_with_checkpointing():
    one_layer = shape(num_layers=1)
    s, b, h, a = 2048, 1, 4096, 32
    eager = setup(1, eager_attention=True, causal_lm=False)
    assert memory.activation_bytes(one_layer, eager) == pytest.approx(s * b * h * (34 + 5 * a * s / h))
    fused = setup(1, causal_lm=False)
    assert memory.activation_bytes(one_layer, fused) == pytest.approx(s * b * h * 34)
    fp32 = setup(1, mixed_precision="no", causal_lm=False)
    assert memory.activation_bytes(one_layer, fp32) == pytest.approx(2 * s * b * h * 34)
    full, ckpt = setup(1), setup(1, activation_checkpointing=True)
    assert memory.activation_bytes(shape(), ckpt) < memory.activation_bytes(shape(), full) / 4


def test_full_dpo_keeps_a_reference_copy_and_doubles_the_rows():
    sft, dpo = (memory.estimate("fsdp", shape(), setup(8, objective=objective)) for objective in ("sft", "dpo"))
    assert dpo.params_bytes == sft.params_bytes + 4 * P  # the frozen reference is not sharded
    assert dpo.activations_bytes == 2 * sft.activations_bytes
    lora = dict(method="lora", objective="dpo")
    assert memory.estimate("fsdp", shape(), setup(8, **lora)).params_bytes == sft.params_bytes  # adapters off


def test_lora_counts_adapters_from_the_target_linear_shapes():
    recipe = make_recipe("meta-llama/Llama-3.1-8B", method={"kind": "lora", "lora": {"r": 16}})
    counts = memory_fit.model_shape(memory_fit.build_meta_model(recipe), quantize_base=False)
    h, kv, ffn = 4096, 1024, 14336
    per_layer = 16 * ((h + h) * 2 + (h + kv) * 2 + (h + ffn) * 3)  # q, o; k, v; gate, up, down
    assert counts.num_trainable_params == 32 * per_layer
    assert counts.num_params == 8_030_261_248 + 32 * per_layer


def test_lora_freezes_the_base_and_trains_only_adapters():
    recipe = make_recipe("meta-llama/Llama-3.1-8B", method={"kind": "lora"}, model={"dtype": "bfloat16"})
    report = memory_fit.plan_report(recipe, gpus_per_node=1)
    ddp, trainable = report.rows[0].memory, report.num_trainable_params
    assert ddp.params_bytes == 2 * (report.num_params - trainable) + 4 * trainable  # bf16 base, fp32 adapters
    assert (ddp.grads_bytes, ddp.optimizer_bytes) == (4 * trainable, 8 * trainable)


def test_qlora_stores_the_base_linears_in_about_half_a_byte():
    recipe = make_recipe("meta-llama/Llama-3.1-70B", method={"kind": "qlora"}, model={"dtype": "bfloat16"},
                         parallelism={"activation_checkpointing": True})
    report = memory_fit.plan_report(recipe, gpus_per_node=1)
    ddp = report.rows[0].memory
    assert 35 * GiB < ddp.params_bytes < 45 * GiB  # 4-bit layers plus fp32 embeddings and head
    assert report.choice == "ddp"



@pytest.mark.parametrize("kind", ["ia3", "prefix_tuning", "prompt_tuning"])
def test_other_adapter_kinds_plan_a_frozen_base_and_small_fp32_state(kind):
    recipe = make_recipe("meta-llama/Llama-3.1-8B", method={"kind": kind}, model={"dtype": "bfloat16"})
    report = memory_fit.plan_report(recipe, gpus_per_node=1)
    ddp, trainable = report.rows[0].memory, report.num_trainable_params
    assert 0 < trainable < report.num_params / 1000  # peft built the adapter on the meta model
    assert ddp.params_bytes == 2 * (report.num_params - trainable) + 4 * trainable
    assert (ddp.grads_bytes, ddp.optimizer_bytes) == (4 * trainable, 8 * trainable)

# --------------------------------------------------------------------------- real architectures
@pytest.mark.parametrize("model_id", sorted(PUBLIC_PARAM_COUNTS))
def test_shipped_configs_plan_with_their_public_parameter_counts(model_id):
    report = memory_fit.plan_report(make_recipe(model_id), gpus_per_node=8)
    assert report.num_params == pytest.approx(PUBLIC_PARAM_COUNTS[model_id], rel=0.01)
    assert {row.memory.strategy for row in report.rows} == set(memory_fit.STRATEGY_ORDER)


def test_every_shipped_config_file_is_covered():
    assert set(memory_fit.architecture_table()) >= {model_id.lower() for model_id in PUBLIC_PARAM_COUNTS}


def test_a_local_folder_plans_from_its_config_json(tmp_path):
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    config.save_pretrained(tmp_path)
    expected = sum(p.numel() for p in transformers.LlamaForCausalLM(config).parameters())
    assert memory_fit.plan_report(make_recipe(str(tmp_path))).num_params == expected


def test_an_unknown_hub_id_names_the_fix():
    with pytest.raises(UserError, match="model_configs"):
        memory_fit.plan_report(make_recipe("nobody/unknown-model"))


# --------------------------------------------------------------------------- the choice
def test_a_tiny_model_picks_ddp():
    name, reason = memory_fit.choose_strategy(make_recipe("tiny:llama", parallelism={"strategy": "auto"}))
    assert name == "ddp"
    assert reason.startswith("ddp fits:") and "per worker" in reason


def test_70b_full_on_8x80_gib_cannot_be_ddp():
    report = memory_fit.plan_report(gpu_recipe("meta-llama/Llama-3.1-70B"))
    ddp = report.rows[0]
    assert ddp.memory.strategy == "ddp" and not ddp.fits
    assert report.choice != "ddp"


def test_nothing_fits_names_the_keys_to_change():
    with pytest.raises(RecipeError, match="parallelism.cpu_offload: true") as error:
        memory_fit.choose_strategy(gpu_recipe("meta-llama/Llama-3.1-70B"))
    assert error.value.problems[0].where == "parallelism.strategy"


def test_with_offload_enabled_auto_picks_an_offloading_strategy():
    recipe = gpu_recipe("meta-llama/Llama-3.1-70B", parallelism={"cpu_offload": True})
    name, reason = memory_fit.choose_strategy(recipe)
    assert name in memory_fit.OFFLOADABLE and f"{name} + cpu offload fits:" in reason


def test_sharding_picks_the_simplest_that_fits():
    report = memory_fit.plan_report(gpu_recipe("meta-llama/Llama-3.1-8B"), gpu_memory_gib=40)
    fits = [row.memory.strategy for row in report.rows if row.fits and row.blocked is None]
    assert report.choice == fits[0] != "ddp"
    assert report.reason == (
        f"{report.choice} fits: {report.row_for(report.choice).need_bytes / GiB:.1f} GiB of 40.0 GiB per device"
    )


def test_more_nodes_shard_further():
    recipe = gpu_recipe("meta-llama/Llama-3.1-70B")
    one, four = (memory_fit.plan_report(recipe, num_nodes=n).row_for("deepspeed_zero3").memory for n in (1, 4))
    assert four.optimizer_bytes == pytest.approx(one.optimizer_bytes / 4, abs=1)


def test_row_for_follows_the_recipes_offload_setting():
    report = memory_fit.plan_report(gpu_recipe("meta-llama/Llama-3.1-8B", parallelism={"cpu_offload": True}))
    assert report.row_for("fsdp").memory.cpu_offload
    assert report.row_for("ddp").blocked == "parallelism.cpu_offload is true"


# --------------------------------------------------------------------------- output
def test_json_output_round_trips():
    recipe = gpu_recipe("meta-llama/Llama-3.1-8B")
    text = render.plan_command_output(recipe, as_json=True)
    report = memory_fit.PlanReport.model_validate_json(text)
    assert report == memory_fit.plan_report(recipe)
    assert json.loads(text)["choice"] == report.choice


def test_table_output_shows_every_strategy_and_the_choice():
    console = Console(record=True, width=250)
    console.print(render.plan_command_output(gpu_recipe("meta-llama/Llama-3.1-8B"), gpus_per_node=8))
    text = console.export_text()
    for name in memory_fit.STRATEGY_ORDER:
        assert name in text
    assert "fsdp + cpu offload" in text and "choice:" in text


def test_the_report_is_frozen():
    report = memory_fit.plan_report(make_recipe())
    with pytest.raises(Exception, match="frozen"):
        report.choice = "fsdp"


def test_a_launch_plans_memory_once_and_the_report_travels_in_the_plan(monkeypatch):
    """`strategy: auto` asks the planner while choosing; the launch reuses that report (host memory, run folder)."""
    from tunefleet.launcher.plan import layout

    calls = []
    real = memory_fit.plan_report
    monkeypatch.setattr(memory_fit, "plan_report", lambda recipe, **kw: calls.append(1) or real(recipe, **kw))
    auto = make_recipe("tiny:llama", parallelism={"strategy": "auto"})
    planned = layout.make_plan(auto)
    assert planned.strategy.name == "ddp" and planned.memory is not None and len(calls) == 1
    assert planned.memory_report(auto) is planned.memory and len(calls) == 1
    fixed = layout.make_plan(make_recipe("tiny:llama", parallelism={"strategy": "ddp"}))
    assert fixed.memory is None and len(calls) == 1  # a fixed strategy plans memory only when the launch needs it
    assert fixed.memory_report(auto).choice == "ddp" and len(calls) == 2
