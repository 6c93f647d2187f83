"""Tokenize once: the content-hashed cache, mixing weights, eval splits, packing
statistics, parallel tokenization, the preprocess report and the shipped sets."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
from rich.console import Console
from transformers import AutoTokenizer

from tests.conftest import REPO
from tunefleet.launcher.cli import render
from tunefleet.launcher.config import DataConfig, DataSource, load_recipe
from tunefleet.launcher.data import batches, preprocess, tiny_data
from tunefleet.launcher.errors import DataError
from tunefleet.launcher.model.inputs import IGNORE_INDEX
from tunefleet.launcher.model.tiny import ensure_tiny_model
from tunefleet.launcher.objectives import grpo
from tunefleet.launcher.objectives.rl_rewards import RewardSpec, WeightedRewards
from tunefleet.launcher.plan.layout import make_plan
from tunefleet.launcher.run.console import LaunchConsole

TINY_DATA = REPO / "recipes" / "tiny" / "data"


@pytest.fixture(scope="module")
def tokenizer_dir():
    return str(ensure_tiny_model("llama"))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def write_rows(path, numbers):
    path.write_text("".join(json.dumps({"instruction": f"Add {i} and 1.", "output": str(i + 1)}) + "\n"
                            for i in numbers))
    return path


def outputs(tokenizer, split) -> list[int]:
    """The numeric answer of every example (the target text minus eos)."""
    texts = [[t for t, lab in zip(*split.row(i), strict=True) if lab != IGNORE_INDEX] for i in range(len(split))]
    return [int(tokenizer.decode(text, skip_special_tokens=True)) for text in texts]


def prepare(tmp_path, tokenizer, tokenizer_dir, *sources, seed=0, **options):
    cfg = DataConfig(sources=list(sources), cache_dir=str(tmp_path / "cache"), **{"max_seq_len": 64, **options})
    return preprocess.prepare(cfg, tokenizer, tokenizer_dir, seed=seed)


def test_cache_is_reused_and_invalidated_by_a_changed_file(tokenizer, tokenizer_dir, tmp_path):
    path = write_rows(tmp_path / "a.jsonl", range(20))
    source = DataSource(path=str(path))
    first = prepare(tmp_path, tokenizer, tokenizer_dir, source)
    stamp = (first / "meta.json").stat().st_mtime_ns
    assert prepare(tmp_path, tokenizer, tokenizer_dir, source) == first
    assert (first / "meta.json").stat().st_mtime_ns == stamp
    write_rows(path, [5])
    second = prepare(tmp_path, tokenizer, tokenizer_dir, source)
    assert second != first and batches.cache_meta(second)["train_rows"] == 1
    assert isinstance(batches.open_split(second, "train").input_ids, np.memmap)


def test_a_folder_source_hash_covers_every_file_in_it(tokenizer, tokenizer_dir, tmp_path):
    folder = tmp_path / "rows"
    folder.mkdir()
    write_rows(folder / "a.jsonl", range(3))
    write_rows(folder / "b.jsonl", range(3, 5))
    source = DataSource(path=str(folder))
    first = prepare(tmp_path, tokenizer, tokenizer_dir, source)
    assert batches.cache_meta(first)["train_rows"] == 5
    write_rows(folder / "b.jsonl", range(3, 6))
    assert prepare(tmp_path, tokenizer, tokenizer_dir, source) != first
    write_rows(folder / "c.jsonl", [9])
    assert batches.cache_meta(prepare(tmp_path, tokenizer, tokenizer_dir, source))["train_rows"] == 7


def test_weights_set_each_sources_rows_per_epoch(tokenizer, tokenizer_dir, tmp_path):
    small = DataSource(path=str(write_rows(tmp_path / "small.jsonl", range(10))), weight=2.5)
    large = DataSource(path=str(write_rows(tmp_path / "large.jsonl", range(100, 140))), weight=0.5)
    folder = prepare(tmp_path, tokenizer, tokenizer_dir, small, large, seed=4)
    answers = outputs(tokenizer, batches.open_split(folder, "train"))
    from_small, from_large = [a for a in answers if a <= 10], [a for a in answers if a > 100]
    assert len(from_small) == 25 and len(from_large) == 20 and len(set(from_large)) == 20
    assert all(from_small.count(a) in (2, 3) for a in range(1, 11))  # two copies, then 5 rows once more
    assert [s["epoch_rows"] for s in batches.cache_meta(folder)["sources"]] == [25, 20]
    again = outputs(tokenizer, batches.open_split(prepare(tmp_path, tokenizer, tokenizer_dir, small, large, seed=4),
                                               "train"))
    assert again == answers


def test_eval_fraction_holds_out_rows_per_source_before_mixing(tokenizer, tokenizer_dir, tmp_path):
    source = DataSource(path=str(write_rows(tmp_path / "a.jsonl", range(40))), weight=2.0)
    folder = prepare(tmp_path, tokenizer, tokenizer_dir, source, eval={"fraction": 0.25})
    train, evaluation = batches.open_split(folder, "train"), batches.open_split(folder, "eval")
    assert len(evaluation) == 10 and len(train) == 60
    assert not set(outputs(tokenizer, evaluation)) & set(outputs(tokenizer, train))


def test_packing_is_reported_and_both_splits_are_packed(tokenizer, tokenizer_dir, tmp_path):
    source = DataSource(path=str(write_rows(tmp_path / "a.jsonl", range(30))))
    options = {"eval": {"fraction": 0.2}, "max_seq_len": 128}  # about 3 rows fit in one
    plain = batches.cache_meta(prepare(tmp_path, tokenizer, tokenizer_dir, source, **options))
    folder = prepare(tmp_path, tokenizer, tokenizer_dir, source, packing=True, **options)
    packed = batches.cache_meta(folder)
    assert packed["train_tokens"] == plain["train_tokens"] and packed["train_rows"] < plain["train_rows"]
    assert packed["epoch_examples"] == plain["train_rows"] == 24
    assert packed["packing_efficiency"] > 2 * plain["packing_efficiency"]
    assert batches.open_split(folder, "eval").position_ids is not None


def test_no_rows_left_is_an_error_before_any_worker(tokenizer, tokenizer_dir, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a"}\n{"oops": 1}\n')
    with pytest.raises(DataError, match=r"no training rows left in data.sources\[0\] \(.*bad.jsonl\): 2 read, 2 "):
        prepare(tmp_path, tokenizer, tokenizer_dir, DataSource(path=str(path)), on_bad_row="skip")


def test_a_source_left_without_rows_is_a_clear_error_and_nothing_is_cached(tokenizer, tokenizer_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a"}\n{"oops": 1}\n{"instruction": "b", "output": "c"\n')
    good = DataSource(path=str(write_rows(tmp_path / "good.jsonl", range(5))))
    with pytest.raises(DataError) as raised:
        prepare(tmp_path, tokenizer, tokenizer_dir, DataSource(path=str(bad)), good, on_bad_row="skip")
    assert str(raised.value).splitlines() == [
        f"no training rows left in data.sources[0] ({bad}): 3 read, 3 skipped, 0 dropped; first reasons:",
        f"  - {bad}:1: field `output` missing",
        f"  - {bad}:2: field `instruction` missing",
        f"  - {bad}:3: invalid JSON (Expecting ',' delimiter at column 35)",
        "fix the rows (or the source's fields, format), or check data.max_seq_len and data.overlong",
    ]
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_bad_rows_of_every_source_and_the_eval_file_are_named_together(tokenizer, tokenizer_dir, tmp_path):
    first, second, held_out = (write_rows(tmp_path / f"{name}.jsonl", range(3)) for name in ("a", "b", "eval"))
    for path in (first, second, held_out):
        path.write_text(path.read_text() + '{"instruction": "x"}\n')
    with pytest.raises(DataError) as raised:
        prepare(tmp_path, tokenizer, tokenizer_dir, DataSource(path=str(first)), DataSource(path=str(second)),
                eval={"path": str(held_out)})
    assert str(raised.value).splitlines() == [
        "3 bad rows; fix them or set data.on_bad_row: skip to leave them out:",
        *(f"  - {path}:4: field `output` missing" for path in (first, second, held_out))]
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_skipped_rows_are_summarised_the_first_20_then_the_count(tmp_path):
    path = write_rows(tmp_path / "rows.jsonl", range(10))
    path.write_text(path.read_text() + "".join(f'{{"instruction": "q{i}"}}\n' for i in range(25)))
    recipe = load_recipe(REPO / "recipes" / "tiny" / "llama-lora-ddp.yaml",
                         [f"data.cache_dir={tmp_path / 'cache'}", f"data.sources=[{{path: {path}}}]",
                          "data.eval=null", "data.on_bad_row=skip"])
    report = preprocess.preprocess_report(recipe)
    assert report["skipped"] == 25 and report["train_rows"] == 10
    assert report["skipped_examples"] == [f"{path}:{n}: field `output` missing" for n in range(11, 31)]
    console = Console(file=io.StringIO(), width=300)
    render.data_report(report, console)
    lines = console.file.getvalue().splitlines()
    start = lines.index("skipped 25 bad rows (data.on_bad_row: skip):")
    assert lines[start + 1:] == [f"  - {e}" for e in report["skipped_examples"]] + [
        "  ... and 5 more (25 bad rows in all)"]
    # the launch header lists the same
    launch = LaunchConsole(console=Console(file=io.StringIO(), width=300))
    planned = make_plan(recipe, "recipe.yaml")
    launch.header(SimpleNamespace(recipe=recipe, strategy_plan=planned.strategy), planned.reason, report)
    header = launch.console.file.getvalue().splitlines()
    start = header.index("  skipped 25 bad rows (data.on_bad_row: skip):")
    assert header[start + 1:] == [f"    - {e}" for e in report["skipped_examples"]] + [
        "    ... and 5 more (25 bad rows in all)"]


def test_parallel_tokenization_gives_the_same_arrays(tokenizer, tokenizer_dir, tmp_path, monkeypatch):
    source = DataSource(path=str(TINY_DATA / "chat_eval.jsonl"), format="chat")
    monkeypatch.setattr(preprocess, "CHUNK_ROWS", 64)
    serial, _ = preprocess.encode_source(source, DataConfig(sources=[source]), tokenizer)
    parallel, _ = preprocess.encode_source(source, DataConfig(sources=[source], num_proc=2), tokenizer)
    for name in ("input_ids", "labels", "offsets"):
        assert np.array_equal(getattr(serial, name), getattr(parallel, name))


def test_preprocess_report_counts_and_renders(tmp_path):
    recipe = load_recipe(REPO / "recipes" / "tiny" / "llama-lora-ddp.yaml",
                         [f"data.cache_dir={tmp_path}", "data.packing=true", "data.eval.path=null",
                          "data.eval.fraction=0.1"])
    report = preprocess.preprocess_report(recipe)
    assert (report["train_rows"] < report["epoch_examples"] == 1800) and report["eval_rows"] > 0
    assert report["cache_dir"].startswith(str(tmp_path)) and not report["reused"]
    assert preprocess.preprocess_report(recipe)["reused"]
    console = Console(file=io.StringIO(), width=200)
    render.data_report(report, console)
    assert "packing efficiency" in console.file.getvalue() and "chat_train.jsonl" in console.file.getvalue()


def test_shipped_preference_and_classification_sets_regenerate_byte_for_byte(tmp_path):
    written = tiny_data.generate(tmp_path)
    assert {p.relative_to(tmp_path).as_posix() for p in written} == {
        "preference/train.jsonl", "preference/eval.jsonl", "classification/train.csv", "classification/eval.csv",
        "sentiment/train.csv", "sentiment/eval.csv", "capitals/train.jsonl", "capitals/eval.jsonl",
        "capitals/prompts_train.jsonl", "capitals/prompts_eval.jsonl", "preference/prompts_train.jsonl",
        "preference/prompts_eval.jsonl"}
    for path in written:
        shipped = TINY_DATA / path.relative_to(tmp_path)
        assert path.read_bytes() == shipped.read_bytes(), f"regenerate {shipped}"
    pairs = [json.loads(line) for line in (tmp_path / "preference/train.jsonl").read_text().splitlines()]
    assert len(pairs) == 1000 and all(p["chosen"] != p["rejected"] for p in pairs)


def bonus(prompt, completion, row):
    return row["bonus"]


def test_prompt_rows_keep_their_other_fields_for_the_rewards(tokenizer, tokenizer_dir, tmp_path):
    """A prompt row's other fields (any JSON) reach the reward functions beside its prompt and answer text,
    through hold-out, mixing two sources, the memory-mapped cache and collation; rows dropped or skipped on
    the way shift nothing."""
    rows = [{"id": f"q{i}", "question": f"What is {i} plus 1?", "answer": i + 1, "bonus": i / 10,
             "meta": {"tests": [i, "ü"]}} for i in range(30)]
    rows.insert(5, {"id": "long", "question": "x " * 200, "answer": 0, "bonus": -1.0})  # overlong: dropped
    rows.insert(9, {"id": "bad", "answer": 3, "bonus": -1.0})  # no question: skipped
    first = tmp_path / "first.jsonl"
    first.write_text("".join(json.dumps(row) + "\n" for row in rows))
    second = tmp_path / "second.jsonl"
    second.write_text("".join(json.dumps({"prompt": f"Name {i}.", "answer": 100 + i, "bonus": 9.0, "id": f"s{i}"})
                              + "\n" for i in range(10)))
    folder = prepare(tmp_path, tokenizer, tokenizer_dir,
                     DataSource(path=str(first), format="prompt", fields={"prompt": "question"}, weight=1.5),
                     DataSource(path=str(second), format="prompt"),
                     eval={"fraction": 0.2}, overlong="drop", on_bad_row="skip")
    rewards = WeightedRewards.from_specs([RewardSpec(f"{__name__}:bonus"), RewardSpec("numeric_match")])
    seen = []
    for name, expected_rows in (("train", 36 + 8), ("eval", 6 + 2)):
        split = batches.open_split(folder, name)
        batch = batches.collate(split, range(split.num_examples), tokenizer.pad_token_id)
        prompts = grpo.prompts_of([batch], tokenizer)
        assert len(prompts.rows) == expected_rows and all(prompts.real)
        for row in prompts.rows:
            i = int(row["id"][1:])
            if row["id"].startswith("q"):
                assert row == {"id": f"q{i}", "prompt": f"What is {i} plus 1?", "answer": str(i + 1),
                               "bonus": i / 10, "meta": {"tests": [i, "ü"]}}
            else:
                assert row == {"id": f"s{i}", "prompt": f"Name {i}.", "answer": str(100 + i), "bonus": 9.0}
        scores = rewards.score([row["prompt"] for row in prompts.rows], [row["answer"] for row in prompts.rows],
                               prompts.rows)
        assert scores.per_reward[f"{__name__}:bonus"] == [row["bonus"] for row in prompts.rows]
        assert scores.per_reward["numeric_match"] == [1.0] * expected_rows
        seen += [row["id"] for row in prompts.rows]
    assert {"long", "bad"}.isdisjoint(seen) and len(set(seen)) == 30 + 10
