"""The recipe schema: shipped recipes validate, errors name keys, overrides are typed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tunefleet.launcher.config import Recipe, load_recipe, read_yaml
from tunefleet.launcher.errors import RecipeError
from tunefleet.launcher.run.driver import check_recipe

SHIPPED = sorted((REPO / "recipes").rglob("*.yaml"))
TINY = REPO / "recipes" / "tiny" / "llama-full-ddp.yaml"


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPO)) for p in SHIPPED])
def test_every_shipped_recipe_validates_and_plans(path):
    recipe = load_recipe(path)
    planned = check_recipe(recipe, str(path))
    plan, reason = planned.strategy, planned.reason
    assert plan.world_size == recipe.parallelism.world_size
    assert reason


def test_required_keys_exist_under_their_documented_names():
    recipe = load_recipe(TINY)
    for key in ["model.path", "method.kind", "data.max_seq_len", "train.max_steps", "train.micro_batch_size",
                "train.grad_accum_steps", "train.lr", "train.seed", "parallelism.strategy",
                "parallelism.num_nodes", "parallelism.workers_per_node", "checkpoint.every_steps",
                "fault_tolerance.max_restarts", "logging.wandb.mode"]:
        node = recipe
        for part in key.split("."):
            node = getattr(node, part)


def write(tmp_path: Path, raw: dict, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def tiny_raw() -> dict:
    raw = yaml.safe_load(TINY.read_text())
    raw["data"]["sources"][0]["path"] = str(REPO / "recipes/tiny/data/alpaca_train.jsonl")
    raw["data"]["eval"]["path"] = str(REPO / "recipes/tiny/data/alpaca_eval.jsonl")
    return raw


def problems_of(path: Path, *overrides: str) -> dict[str, str]:
    with pytest.raises(RecipeError) as info:
        check_recipe(load_recipe(path, list(overrides)), str(path))
    return {p.where: p.message for p in info.value.problems}


def test_all_errors_reported_at_once_and_named_by_key(tmp_path):
    raw = tiny_raw()
    raw["train"]["lrr"] = 1
    raw["train"]["max_steps"] = "many"
    raw["parallelism"]["strategy"] = "zero9"
    del raw["model"]
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, raw))
    where = {p.where: p.message for p in info.value.problems}
    assert "unknown key" in where["train.lrr"]
    assert "train.max_steps" in where and "parallelism.strategy" in where
    assert where["model"] == "required key is missing"


def test_missing_files_named(tmp_path):
    raw = tiny_raw()
    raw["data"]["sources"][0]["path"] = "nope.jsonl"
    raw["model"]["path"] = "./no-such-model"
    where = problems_of(write(tmp_path, raw))
    assert "not found" in where["data.sources.0.path"]
    assert "does not exist" in where["model.path"]


def test_relative_paths_resolve_against_recipe_folder(tmp_path):
    recipe = load_recipe(TINY)
    assert recipe.data.sources[0].path == str(REPO / "recipes/tiny/data/alpaca_train.jsonl")
    assert recipe.output_dir == str(REPO / "runs/tiny-llama-full-ddp")


def test_overrides_are_typed_and_paths_resolve_against_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(TINY, ["train.lr=1e-4", "train.max_steps=70", "output_dir=out", "method.kind=lora"])
    assert recipe.train.lr == 1e-4 and recipe.train.max_steps == 70
    assert recipe.output_dir == str(tmp_path / "out")
    assert recipe.method.kind == "lora"


@pytest.mark.parametrize("override,key", [
    ("train.lr=fast", "train.lr"), ("train.nope=1", "train.nope"), ("notakey", "notakey"),
    ("parallelism.strategy=zero", "parallelism.strategy"),
])
def test_bad_overrides_name_the_key(override, key):
    with pytest.raises(RecipeError) as info:
        load_recipe(TINY, [override])
    assert any(p.where == key for p in info.value.problems), info.value


def test_cross_field_rules_name_the_key():
    with pytest.raises(RecipeError) as info:
        load_recipe(TINY, ["train.warmup_steps=10000"])
    assert "train.warmup_steps" in str(info.value)
    with pytest.raises(RecipeError) as info:
        load_recipe(TINY, ["parallelism.mixed_precision=fp16"])
    assert "parallelism.mixed_precision" in str(info.value)


def test_malformed_yaml_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nmodel: [unclosed\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert f"{path}:" in str(info.value) and "malformed YAML" in str(info.value)


def test_every_field_has_a_description():
    schema = Recipe.model_json_schema()
    for where, section in [("recipe", schema), *schema["$defs"].items()]:
        for name, prop in section.get("properties", {}).items():
            assert prop.get("description"), f"{where}.{name} has no description"


def test_schema_is_json_and_forbids_extra():
    schema = json.loads(json.dumps(Recipe.model_json_schema()))
    assert schema["additionalProperties"] is False
    assert schema["$defs"]["TrainConfig"]["additionalProperties"] is False


def test_fingerprint_changes_with_the_recipe():
    assert load_recipe(TINY).fingerprint() == load_recipe(TINY).fingerprint()
    assert load_recipe(TINY).fingerprint() != load_recipe(TINY, ["train.lr=0.1"]).fingerprint()


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPO)) for p in SHIPPED])
def test_resolved_recipe_loads_back_unchanged(path):
    """recipe.resolved.yaml (every default filled in) is itself a valid recipe."""
    recipe = load_recipe(path)
    again = Recipe.model_validate(yaml.safe_load(recipe.to_yaml()))
    assert again == recipe


def test_non_utf8_recipe_is_named(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert [(p.where, p.message) for p in info.value.problems] == [
        (str(path), "not a UTF-8 text file (byte 0xe9 at offset 9); save the recipe as UTF-8 YAML")]


def test_duplicate_keys_are_rejected_with_both_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text(TINY.read_text().replace("  max_steps: 120\n", "  max_steps: 20\n  max_steps: 30\n"))
    first = path.read_text().splitlines().index("  max_steps: 20") + 1
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert [(p.where, p.message) for p in info.value.problems] == [
        (f"{path}:{first + 1}", f"key `max_steps` given twice, on lines {first} and {first + 1}; keep one")]


def test_a_folder_given_as_recipe_is_named(tmp_path):
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path)
    assert info.value.problems[0].message == "is a folder; give the recipe's YAML file"


@pytest.mark.parametrize("where,suggestion", [
    ("trian", "train"), ("train.max_step", "max_steps"), ("checkpoint.asynk", "async"),
    ("data.sources.0.formatt", "format"),
])
def test_a_near_miss_key_gets_a_suggestion(tmp_path, where, suggestion):
    raw = tiny_raw()
    *parents, key = [int(part) if part.isdigit() else part for part in where.split(".")]
    node = raw
    for part in parents:
        node = node[part]
    node[key] = node.pop(suggestion, 1)
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, raw))
    found = {p.where: p.message for p in info.value.problems}
    assert found[where].endswith(f"did you mean `{suggestion}`?"), found


def test_a_far_off_key_gets_no_suggestion():
    with pytest.raises(RecipeError) as info:
        load_recipe(TINY, ["train.zzzz=1"])
    assert "did you mean" not in str(info.value)


def test_a_model_path_that_is_a_file_is_named(tmp_path):
    raw = tiny_raw()
    raw["model"]["path"] = str(TINY)
    where = problems_of(write(tmp_path, raw))
    assert where["model.path"] == (f"{TINY} is a file, not a folder; point model.path at the Hugging Face "
                                   "model folder (the one holding config.json)")


def test_a_key_overriding_a_merged_anchor_is_no_duplicate(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text("base: &base {a: 1, b: 2}\nderived:\n  <<: *base\n  b: 3\n")
    assert read_yaml(path) == {"base": {"a": 1, "b": 2}, "derived": {"a": 1, "b": 3}}


def test_a_nul_byte_is_malformed_yaml(tmp_path):  # PyYAML refuses it when the loader is built, before parsing
    path = tmp_path / "nul.yaml"
    path.write_bytes(b"\x00name: x\n")
    with pytest.raises(RecipeError, match="malformed YAML"):
        load_recipe(path)


GRPO = REPO / "recipes" / "tiny" / "llama-capitals-grpo.yaml"
PPO = REPO / "recipes" / "tiny" / "llama-rlhf-ppo.yaml"


def load_problems(path: Path, *overrides: str) -> dict[str, str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, list(overrides))
    return {p.where: p.message for p in info.value.problems}


def test_grpo_settings_are_checked_and_named():
    recipe = load_recipe(GRPO, ["method.rl.reward=[exact_match, {function: contains, weight: 0.5}]"])
    assert [(r.function, r.weight) for r in recipe.method.rl.reward] == [("exact_match", 1.0), ("contains", 0.5)]
    assert "only PPO's value head and GAE use it" in load_problems(GRPO, "method.rl.gamma=0.9")["method.rl.gamma"]
    assert "not both or neither" in str(load_problems(GRPO, "method.rl.reward=[{weight: 2}]"))
    assert "method.rl.group_size" in load_problems(GRPO, "method.rl.group_size=1")
    # GRPO samples from prompt rows; SFT rows are refused, and so is grpo on sft's prompt-format rows
    message = str(load_problems(TINY, "method.objective=grpo"))
    assert "method.objective grpo needs prompt rows, these are alpaca/chat/completion/text" in message
    as_sft = str(load_problems(GRPO, "method.objective=sft"))
    assert "needs alpaca/chat/completion/text rows, these are prompt" in as_sft
    assert "is not supported with method.kind prompt_tuning" in str(load_problems(GRPO, "method.kind=prompt_tuning"))


def test_grpo_refuses_what_zero3_cannot_build_with_the_reason():
    where = problems_of(GRPO, "parallelism.strategy=deepspeed_zero3")
    assert "needs an unsharded reference copy" in where["parallelism.strategy"]
    assert "method.rl.kl_coef: 0 (no reference)" in where["parallelism.strategy"]
    check_recipe(load_recipe(GRPO, ["parallelism.strategy=deepspeed_zero3", "method.rl.kl_coef=0"]), str(GRPO))
    check_recipe(load_recipe(GRPO, ["parallelism.strategy=fsdp"]), str(GRPO))
    rm = REPO / "recipes" / "tiny" / "data"  # any folder: the layout check comes before the folder's own check
    where = problems_of(GRPO, "parallelism.strategy=deepspeed_zero3", "method.rl.kl_coef=0",
                        f"method.rl.reward=[{{model: {rm}}}]")
    assert "a reward model runs beside the policy" in where["parallelism.strategy"]


def test_grpo_reward_problems_stop_the_launch_with_the_key(tmp_path):
    where = problems_of(GRPO, f"method.rl.reward=[{{model: {tmp_path}}}]")
    assert where["method.rl.reward"].startswith(f"reward model {tmp_path} holds no model (no config.json)")
    where = problems_of(GRPO, "method.rl.reward=[exact_match, {function: contains, options: {field: missing}}]")
    assert "the row has no field 'missing'" in where["method.rl.reward"]


def test_a_reward_reading_a_row_field_is_checked_on_the_first_row(tmp_path, monkeypatch):
    """The pre-launch check hands a user reward the first row's other fields, as training does."""
    (tmp_path / "level_rewards.py").write_text("def by_level(prompt, completion, row):\n    return row['level']\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"q": "2+2?", "answer": 4, "level": 0.5, "id": "r1"}) + "\n")
    overrides = [f"data.sources=[{{path: {data}, format: prompt, fields: {{prompt: q}}}}]",
                 "method.rl.reward=[level_rewards:by_level]"]
    check_recipe(load_recipe(GRPO, overrides), str(GRPO))
    data.write_text(json.dumps({"q": "2+2?", "answer": 4, "id": "r1"}) + "\n")
    where = problems_of(GRPO, *overrides)
    assert where["method.rl.reward"].startswith("reward 'level_rewards:by_level' raised KeyError: 'level' on row 0 "
                                                "(id 'r1')"), where


def test_ppo_settings_are_checked_and_named():
    recipe = load_recipe(PPO, ["method.rl.group_size=1"])
    assert recipe.method.online_rl and recipe.method.rl.group_size == 1 and recipe.method.rl.kl_estimator == "k1"
    scaled = load_problems(PPO, "method.rl.scale_rewards=false")["method.rl.scale_rewards"]
    assert "only GRPO scales rewards within a group" in scaled
    assert "per token" in load_problems(PPO, "method.rl.loss_average=sequence")["method.rl.loss_average"]
    assert "needs prompt rows" in str(load_problems(TINY, "method.objective=ppo"))
    assert "is not supported with method.kind prefix_tuning" in str(load_problems(PPO, "method.kind=prefix_tuning"))
    # A resolved recipe holds every key (at its default): it loads again.
    assert load_recipe(GRPO).method.model_dump(mode="json")["rl"]["gamma"] == 1.0
    check_recipe(load_recipe(PPO, ["parallelism.strategy=fsdp"]), str(PPO))
    where = problems_of(PPO, "parallelism.strategy=deepspeed_zero3")
    assert "needs an unsharded reference copy" in where["parallelism.strategy"]
    check_recipe(load_recipe(PPO, ["parallelism.strategy=deepspeed_zero3", "method.kind=lora"]), str(PPO))
