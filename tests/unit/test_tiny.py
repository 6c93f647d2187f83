"""The offline tiny models, tokenizer and shipped data (tunefleet.launcher.model.tiny)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunefleet.launcher.errors import UserError
from tunefleet.launcher.model import tiny

REPO = Path(__file__).parents[2]
DATA_DIR = REPO / "recipes" / "tiny" / "data"


@pytest.fixture(scope="module")
def rows() -> dict[str, list[dict]]:
    return tiny.dataset_rows(seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.build_tokenizer(tiny.tokenizer_corpus())


def _prompts(rows: dict[str, list[dict]], split: str) -> set[str]:
    alpaca = {f"{r['instruction']}\n{r['input']}".rstrip("\n") for r in rows[f"alpaca_{split}"]}
    chat = {m["content"] for r in rows[f"chat_{split}"] for m in r["messages"] if m["role"] == "user"}
    return alpaca | chat


# --------------------------------------------------------------------------- data
def test_generated_files_equal_the_committed_ones(tmp_path):
    paths = tiny.generate_datasets(tmp_path, seed=0)
    assert sorted(p.name for p in paths.values()) == sorted(p.name for p in DATA_DIR.glob("*.jsonl"))
    for path in paths.values():
        assert path.read_bytes() == (DATA_DIR / path.name).read_bytes(), f"regenerate {DATA_DIR / path.name}"


def test_seed_changes_the_data(rows):
    assert tiny.dataset_rows(seed=1)["alpaca_train"] != rows["alpaca_train"]


def test_row_counts(rows):
    assert {name: len(r) for name, r in rows.items()} == {
        "alpaca_train": 3000, "alpaca_eval": 200, "chat_train": 2000, "chat_eval": 200, "text_reference": 200,
    }


def test_eval_prompts_never_appear_in_any_train_file(rows):
    assert not _prompts(rows, "eval") & _prompts(rows, "train")
    eval_alpaca = [(r["instruction"], r["input"]) for r in rows["alpaca_eval"]]
    assert len(set(eval_alpaca)) == len(eval_alpaca)


def test_alpaca_rows_are_well_formed(rows):
    for row in rows["alpaca_train"] + rows["alpaca_eval"]:
        assert list(row) == ["instruction", "input", "output"]
        assert all(isinstance(v, str) for v in row.values())
        assert row["instruction"] and row["output"]
    assert any(r["input"] == "" for r in rows["alpaca_train"])
    assert any(r["input"] != "" for r in rows["alpaca_train"])


def test_chat_rows_are_well_formed(rows):
    for row in rows["chat_train"] + rows["chat_eval"]:
        roles = [m["role"] for m in row["messages"]]
        if roles[0] == "system":
            roles = roles[1:]
        assert roles in (["user", "assistant"], ["user", "assistant"] * 2)
        assert all(isinstance(m["content"], str) and m["content"] for m in row["messages"])
    train = rows["chat_train"]
    assert any(r["messages"][0]["role"] == "system" for r in train)
    assert any(len(r["messages"]) >= 4 for r in train)


def test_text_rows_are_well_formed(rows):
    assert all(list(r) == ["text"] and len(r["text"]) > 20 for r in rows["text_reference"])


def test_every_row_fits_128_tokens(rows, tokenizer):
    for row in rows["chat_train"] + rows["chat_eval"]:
        rendered = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        assert len(tokenizer(rendered).input_ids) <= 128
    for row in rows["alpaca_train"] + rows["text_reference"]:
        assert len(tokenizer(" ".join(row.values())).input_ids) <= 100


# --------------------------------------------------------------------------- tokenizer
def test_tokenizer_is_deterministic_within_a_process(tokenizer):
    again = tiny.build_tokenizer(tiny.tokenizer_corpus())
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_tokenizer_is_deterministic_across_processes(tokenizer):
    # Nodes build their own copy: string hashing and Rust's HashMap order must not matter.
    code = ("from tunefleet.launcher.model import tiny; "
            "print(tiny.build_tokenizer(tiny.tokenizer_corpus()).backend_tokenizer.to_str())")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == tokenizer.backend_tokenizer.to_str()


def test_tokenizer_special_tokens(tokenizer):
    assert len(tokenizer) == tiny.TOKENIZER_VOCAB_SIZE
    ids = (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id)
    assert ids == (0, 1, 2, 3)
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [4, 5]
    assert tokenizer("<|im_end|>").input_ids == [5]


@pytest.mark.parametrize("text", ["Reverse the word.\ntable", "Add 17 and 25.", "naïve café 😀\n\ttabs  spaces"])
def test_tokenizer_round_trips(tokenizer, text):
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text


def test_chat_template_renders_roles_and_generation_prompt(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 1 and 2."}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nAdd 1 and 2.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    rendered = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": "3"}], tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n3<|im_end|>\n")


# --------------------------------------------------------------------------- models
@pytest.mark.parametrize("spec", ["llama", "qwen2"])
def test_tiny_model_saves_and_loads_back(tmp_path, spec):
    path = tiny.ensure_tiny_model(spec, tmp_path)
    assert path.parent == tmp_path / "tiny-models" and path.name.startswith(f"{spec}-")
    assert (path / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert 0.5e6 <= sum(p.numel() for p in model.parameters()) <= 2e6
    batch = tokenizer(["Add 17 and 25.", "Uppercase the text."], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[-1] == len(tokenizer) == model.config.vocab_size
    assert torch.isfinite(logits).all()
    assert tokenizer.chat_template == tiny.CHAT_TEMPLATE


@pytest.mark.parametrize("spec", ["llama", "qwen2", "mistral"])
def test_auto_tokenizer_encodes_like_the_built_one(tmp_path, tokenizer, spec):
    # AutoTokenizer picks a class by model type (Qwen2Tokenizer rebuilds its own pipeline).
    loaded = AutoTokenizer.from_pretrained(tiny.ensure_tiny_model(spec, tmp_path))
    assert len(loaded) == len(tokenizer)
    texts = tiny.tokenizer_corpus()[::50] + ["naïve café 😀 12345", "<|im_start|>user\nhi<|im_end|>\n"]
    assert [loaded(t).input_ids for t in texts] == [tokenizer(t).input_ids for t in texts]
    assert loaded.decode(loaded("Add 17 and 25.").input_ids) == "Add 17 and 25."


def test_second_call_reuses_the_folder(tmp_path):
    first = tiny.ensure_tiny_model("llama", tmp_path)
    mtime_ns = (first / "model.safetensors").stat().st_mtime_ns
    assert tiny.ensure_tiny_model("llama", tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime_ns
    assert os.listdir(first.parent) == [first.name]


def test_losing_the_build_race_keeps_the_winner(tmp_path):
    target = tmp_path / "tiny-models" / "llama-winner"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    tiny._build_atomically(tiny.tiny_config("llama"), tiny.build_tokenizer(tiny.tokenizer_corpus()), target)
    assert os.listdir(target) == ["config.json"]
    assert os.listdir(target.parent) == ["llama-winner"]


def test_cache_dir_defaults_to_env(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNEFLEET_CACHE", str(tmp_path))
    assert tiny.ensure_tiny_model("mistral").parent == tmp_path / "tiny-models"


@pytest.mark.parametrize(("spec", "nominal"), [("llama-20m", 20e6), ("llama-100m", 100e6), ("qwen2-20m", 20e6),
                                                   ("llama-1b", 1.1e9)])
def test_sized_configs_match_their_nominal_size(spec, nominal):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny.tiny_config(spec))
    assert 0.75 * nominal <= sum(p.numel() for p in model.parameters()) <= 1.25 * nominal


def test_every_spec_has_a_config():
    assert {"llama", "qwen2", "mistral", "llama-20m", "llama-100m", "qwen2-20m"} <= set(tiny.TINY_SPECS)
    sizes = {spec: tiny.tiny_config(spec).vocab_size for spec in tiny.TINY_SPECS}
    # the tokenizer's vocabulary; the GPU benchmark's 1b models have a real model's 32000 rows
    assert all(size == (32000 if spec.endswith("-1b") else tiny.TOKENIZER_VOCAB_SIZE) for spec, size in sizes.items())


def test_unknown_spec_lists_the_valid_ones(tmp_path):
    with pytest.raises(UserError, match=r"unknown tiny model 'tiny:gpt9'.*tiny:llama, .*tiny:qwen2-20m"):
        tiny.ensure_tiny_model("gpt9", tmp_path)
