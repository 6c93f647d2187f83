"""Bad input through the real CLI: one clear message naming the key or file, exit 2,
no traceback, nothing written."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import REPO, tunefleet

TINY = REPO / "recipes" / "tiny" / "llama-full-ddp.yaml"


def tiny_raw(out) -> dict:
    raw = yaml.safe_load(TINY.read_text())
    raw["data"]["sources"][0]["path"] = str(REPO / "recipes/tiny/data/alpaca_train.jsonl")
    raw["data"]["eval"]["path"] = str(REPO / "recipes/tiny/data/alpaca_eval.jsonl")
    raw["output_dir"] = str(out)
    return raw


def broken(raw: dict, case: str) -> dict | str | bytes:
    if case == "malformed":
        return "name: x\ntrain: {max_steps: 3\n"
    if case == "not_utf8":  # saved as Latin-1, as some editors do
        return yaml.safe_dump(raw).replace("name: ", "name: caf\u00e9-").encode("latin-1")
    if case == "duplicate_key":
        return yaml.safe_dump(raw).replace("  max_steps: 120\n", "  max_steps: 20\n  max_steps: 30\n")
    if case == "unknown_key":
        raw["train"]["learning_rate"] = 1e-3
    elif case == "mistyped":
        raw["train"]["micro_batch_size"] = "eight"
    elif case == "missing_data":
        raw["data"]["sources"][0]["path"] = "/nonexistent/train.jsonl"
    elif case == "missing_model":
        raw["model"]["path"] = "/nonexistent/model"
    elif case == "model_is_file":
        raw["model"]["path"] = str(TINY)
    elif case == "near_miss_section":
        raw["trian"] = raw.pop("train")
    elif case == "layout":
        raw["parallelism"]["use_gpu"] = True
    elif case == "dpo_zero3":  # full-fine-tuning DPO needs an unsharded reference copy
        raw["data"]["sources"] = [{"path": str(REPO / "recipes/tiny/data/preference/train.jsonl"),
                                   "format": "preference"}]
        raw["data"]["eval"]["path"] = str(REPO / "recipes/tiny/data/preference/eval.jsonl")
        raw["method"]["objective"] = "dpo"
        raw["parallelism"]["strategy"] = "deepspeed_zero3"
    elif case == "async_deepspeed":
        raw["checkpoint"]["async"] = True
        raw["parallelism"]["strategy"] = "deepspeed_zero2"
    return raw


EXPECTED = {
    "malformed": "malformed YAML", "unknown_key": "train.learning_rate", "mistyped": "train.micro_batch_size",
    "missing_data": "data.sources.0.path", "missing_model": "model.path", "layout": "parallelism.use_gpu",
    "dpo_zero3": "parallelism.strategy: method.objective dpo with method.kind full",
    "async_deepspeed": "checkpoint.async: deepspeed_zero2 writes DeepSpeed's own checkpoints",
    "not_utf8": "not a UTF-8 text file", "duplicate_key": "key `max_steps` given twice, on lines",
    "model_is_file": "is a file, not a folder", "near_miss_section": "trian: unknown key; did you mean `train`?",
}


CASES = [("launch", case) for case in sorted(EXPECTED)] + [
    ("validate", case) for case in ("unknown_key", "missing_data", "not_utf8", "duplicate_key")]


@pytest.mark.parametrize("command,case", CASES)
def test_bad_input_is_one_clear_message(tmp_path, case, command):
    out = tmp_path / "run"
    content = broken(tiny_raw(out), case)
    path = tmp_path / "recipe.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    result = tunefleet(command, str(path), env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2, result.stdout + result.stderr
    assert EXPECTED[case] in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not out.exists()


def test_validate_accepts_shipped_recipes():
    # The GPU recipes of the catalogue need GPUs on this machine; test_catalogue validates them as on
    # their cluster.
    paths = sorted(str(p) for p in (REPO / "recipes" / "tiny").rglob("*.yaml"))
    result = tunefleet("validate", *paths)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ok ") == len(paths)


def test_recipes_lists_every_shipped_recipe():
    result = tunefleet("recipes", env={"COLUMNS": "250"})  # wide enough that no name is cut
    assert result.returncode == 0
    for path in (REPO / "recipes").rglob("*.yaml"):
        assert path.stem in result.stdout  # named as `tunefleet init --from` takes them


def test_schema_prints_json_schema():
    result = tunefleet("schema")
    schema = json.loads(result.stdout)
    assert {"model", "train", "parallelism"} <= schema["properties"].keys()


def test_a_folder_given_as_recipe(tmp_path):
    result = tunefleet("validate", str(tmp_path))
    assert result.returncode == 2, result.stderr
    assert f"{tmp_path}: is a folder; give the recipe's YAML file" in result.stderr


def test_validate_takes_set():
    result = tunefleet("validate", str(TINY), "--set", "train.lr=fast", "--set", "train.max_steps=70")
    assert result.returncode == 2 and "train.lr" in result.stderr and "max_steps" not in result.stderr
    assert tunefleet("validate", str(TINY), "--set", "train.max_steps=70").returncode == 0


def test_bad_set_syntax(tmp_path):
    result = tunefleet("launch", str(TINY), "--set", "train.lr")
    assert result.returncode == 2 and "KEY=VALUE" in result.stderr


def test_plan_prints_every_strategy_and_the_choice():
    result = tunefleet("plan", str(TINY), "--json", "--gpus-per-node", "8", "--gpu-memory-gib", "80")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert {row["memory"]["strategy"] for row in report["rows"]} >= {"ddp", "fsdp", "deepspeed_zero2",
                                                                        "deepspeed_zero3"}
    table = tunefleet("plan", str(TINY))
    assert "choice: ddp" in table.stdout


def test_plan_piped_to_a_file_is_written_full_width():
    result = tunefleet("plan", str(TINY), env={"COLUMNS": ""})  # stdout is a pipe, not a terminal
    assert result.returncode == 0, result.stderr
    assert "…" not in result.stdout, result.stdout
    header = next(line for line in result.stdout.splitlines() if "strategy" in line)
    assert "total per worker" in header and "host per worker" in header
    assert {"ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"} <= {
        line.split()[1] for line in result.stdout.splitlines() if line.startswith("│")}
