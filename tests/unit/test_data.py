"""Rows -> tokens with loss masks, the tokenize-once cache, and the sampler."""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from tests.conftest import REPO
from tunefleet.launcher import data
from tunefleet.launcher.errors import DataError
from tunefleet.launcher.recipe import DataConfig, DataSource
from tunefleet.launcher.tiny import ensure_tiny_model

TINY_DATA = REPO / "recipes" / "tiny" / "data"


@pytest.fixture(scope="module")
def tokenizer_dir():
    return str(ensure_tiny_model("llama"))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def targets_text(tokenizer, split, index: int) -> str:
    ids, labels = split.row(index)
    return tokenizer.decode([int(t) for t, lab in zip(ids, labels) if lab != data.IGNORE_INDEX])


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(*sources: DataSource, **kwargs) -> DataConfig:
    return DataConfig(sources=list(sources), **{"max_seq_len": 128, **kwargs})


def test_alpaca_loss_only_on_the_response(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Reverse the word: table", "input": "", "output": "elbat"}])
    split = data.load_split([DataSource(path=str(path))], tokenizer, config(DataSource(path=str(path))))
    assert targets_text(tokenizer, split, 0) == "elbat" + tokenizer.eos_token
    full = tokenizer.decode([int(t) for t in split.row(0)[0]])
    assert "### Instruction:\nReverse the word: table" in full


def test_train_on_prompt_marks_every_token(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add 1 and 2.", "output": "3"}])
    cfg = config(DataSource(path=str(path)), train_on_prompt=True)
    ids, labels = data.load_split(cfg.sources, tokenizer, cfg).row(0)
    assert (labels[1:] == ids[1:]).all()


def test_chat_loss_only_on_assistant_turns(tokenizer, tmp_path):
    row = {"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Uppercase: ab"},
        {"role": "assistant", "content": "AB"}, {"role": "user", "content": "Sort the letters: cba"},
        {"role": "assistant", "content": "abc"},
    ]}
    path = write_jsonl(tmp_path / "c.jsonl", [row])
    source = DataSource(path=str(path), format="chat")
    split = data.load_split([source], tokenizer, config(source))
    assert targets_text(tokenizer, split, 0) == "AB<|im_end|>\nabc<|im_end|>\n"
    full = tokenizer.decode([int(t) for t in split.row(0)[0]])
    assert full.endswith(tokenizer.apply_chat_template(row["messages"], tokenize=False))


@pytest.mark.parametrize("row,line_field", [
    ({"instruction": "x"}, "field `output` missing"),
    ({"instruction": 3, "output": "y"}, "field `instruction` must be a string"),
    ({"instruction": "  ", "output": "y"}, "field `instruction` is empty"),
])
def test_bad_alpaca_rows_name_file_line_and_field(tokenizer, tmp_path, row, line_field):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "ok", "output": "ok"}, row])
    source = DataSource(path=str(path))
    with pytest.raises(DataError, match=rf"bad.jsonl:2: {line_field}"):
        data.load_split([source], tokenizer, config(source))


def test_bad_chat_role_and_invalid_json(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "robot", "content": "hi"}]}])
    source = DataSource(path=str(path), format="chat")
    with pytest.raises(DataError, match=r"c.jsonl:1: messages\[0\].role is 'robot'"):
        data.load_split([source], tokenizer, config(source))
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"instruction": "a", "output": "b"}\n{not json}\n')
    with pytest.raises(DataError, match=r"b.jsonl:2: invalid JSON"):
        data.load_split([DataSource(path=str(broken))], tokenizer, config(DataSource(path=str(broken))))


def test_truncation_is_counted(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "word " * 50, "output": "y"}])
    cfg = config(DataSource(path=str(path)), max_seq_len=16)
    split = data.load_split(cfg.sources, tokenizer, cfg)
    assert split.num_truncated == 1 and len(split.row(0)[0]) == 16


def test_cache_is_reused_and_invalidated_by_a_changed_file(tokenizer, tokenizer_dir, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"Add {i} and 1.", "output": str(i + 1)} for i in range(20)])
    cfg = config(DataSource(path=str(path)), cache_dir=str(tmp_path / "cache"))
    first = data.prepare(cfg, tokenizer, tokenizer_dir, seed=0)
    stamp = (first / "meta.json").stat().st_mtime_ns
    assert data.prepare(cfg, tokenizer, tokenizer_dir, seed=0) == first
    assert (first / "meta.json").stat().st_mtime_ns == stamp
    write_jsonl(path, [{"instruction": "Add 5 and 5.", "output": "10"}])
    second = data.prepare(cfg, tokenizer, tokenizer_dir, seed=0)
    assert second != first and data.cache_meta(second)["train_rows"] == 1
    assert isinstance(data.open_split(second, "train").input_ids, np.memmap)


def test_global_batches_do_not_depend_on_world_size():
    """Ranks x micro-batches partition the same global batch whatever the layout."""
    def rows_seen(world_size, micro, accum, step):
        seen = []
        for rank in range(world_size):
            indices = data.global_batch_indices(100, step, micro * accum * world_size, seed=3)
            seen.extend(indices[rank::world_size].tolist())
        return sorted(seen)

    for step in (0, 7, 13):  # 13 crosses an epoch boundary (16 rows x 13 > 100)
        reference = rows_seen(1, 16, 1, step)
        assert rows_seen(2, 4, 2, step) == reference == rows_seen(4, 1, 4, step)
    assert not np.array_equal(data.global_batch_indices(100, 0, 16, 1), data.global_batch_indices(100, 0, 16, 2))


def test_each_epoch_visits_every_row_once():
    batches = [data.global_batch_indices(48, step, 16, seed=0) for step in range(3)]
    assert sorted(np.concatenate(batches).tolist()) == list(range(48))


def test_eval_batches_equal_count_on_every_rank(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"Add {i} and 1.", "output": "x"} for i in range(7)])
    cfg = config(DataSource(path=str(path)))
    split = data.load_split(cfg.sources, tokenizer, cfg)
    counts = [len(data.eval_batches(split, rank=r, world_size=3, batch_size=2, max_rows=None, pad_id=0))
              for r in range(3)]
    assert counts == [2, 2, 2]
