"""Rows -> tokens with loss masks: every format on known examples, field and role
mapping, chat templates, file types, and bad rows named by file, line and field."""

from __future__ import annotations

import copy
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError
from transformers import AutoTokenizer

from tunefleet.launcher.config import DataConfig, DataSource
from tunefleet.launcher.data import sources
from tunefleet.launcher.data.preprocess import encode_source
from tunefleet.launcher.errors import DataError
from tunefleet.launcher.model.inputs import IGNORE_INDEX
from tunefleet.launcher.model.tiny import ensure_tiny_model

CHAT = [
    {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Uppercase: ab"},
    {"role": "assistant", "content": "AB"}, {"role": "user", "content": "Sort the letters: cba"},
    {"role": "assistant", "content": "abc"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ensure_tiny_model("llama"))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def encode(tokenizer, path, fmt="alpaca", *, source=None, **options):
    source = source or DataSource(path=str(path), format=fmt)
    cfg = DataConfig(sources=[source], **{"max_seq_len": 128, **options})
    return encode_source(source, cfg, tokenizer)


def target_runs(tokenizer, split, row: int) -> list[str]:
    """The decoded runs of consecutive target tokens of a row."""
    ids, labels = split.row(row)
    runs, current = [], []
    for token, label in zip(ids.tolist(), labels.tolist(), strict=True):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs, current = runs + [tokenizer.decode(current)], []
    return runs + ([tokenizer.decode(current)] if current else [])


# --------------------------------------------------------------------------- formats
def test_alpaca_loss_only_on_the_response(tokenizer, tmp_path):
    row = {"instruction": "Reverse the word: table", "input": "", "output": "elbat"}
    path = write_jsonl(tmp_path / "a.jsonl", [row])
    split, counts = encode(tokenizer, path)
    assert target_runs(tokenizer, split, 0) == ["elbat<|eos|>"] and counts.kept == 1
    ids, labels = split.row(0)
    assert ids[0] == tokenizer.bos_token_id and labels[0] == IGNORE_INDEX
    assert tokenizer.decode(ids[1:]) == "### Instruction:\nReverse the word: table\n\n### Response:\nelbat<|eos|>"


def test_train_on_prompt_marks_every_token_after_bos(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add 1 and 2.", "output": "3"}])
    ids, labels = encode(tokenizer, path, train_on_prompt=True)[0].row(0)
    assert (labels[1:] == ids[1:]).all() and labels[0] == IGNORE_INDEX


def test_chat_loss_only_on_assistant_turns(tokenizer, tmp_path):
    split, _ = encode(tokenizer, write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}]), "chat")
    assert target_runs(tokenizer, split, 0) == ["AB<|im_end|>\n", "abc<|im_end|>\n"]
    full = tokenizer.decode(split.row(0)[0].tolist())
    assert full == "<|bos|>" + tokenizer.apply_chat_template(CHAT, tokenize=False)


def test_sharegpt_fields_and_roles_map_to_the_same_tokens(tokenizer, tmp_path):
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    row = {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in CHAT]}
    source = DataSource(path=str(write_jsonl(tmp_path / "s.jsonl", [row])), format="chat",
                        fields={"messages": "conversations", "role": "from", "content": "value"},
                        roles={"human": "user", "gpt": "assistant"})
    mapped, _ = encode(tokenizer, None, source=source)
    canonical, _ = encode(tokenizer, write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}]), "chat")
    assert [a.tolist() for a in mapped.row(0)] == [a.tolist() for a in canonical.row(0)]


def test_builtin_llama3_template_and_no_double_bos(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT[1:3]}])
    split, _ = encode(tokenizer, path, "chat", chat_template="llama3")
    ids = split.row(0)[0].tolist()
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids).startswith("<|bos|><|start_header_id|>user<|end_header_id|>\n\nUppercase: ab")
    assert target_runs(tokenizer, split, 0) == ["AB<|eot_id|>"]


def test_a_tokenizer_without_chat_template_needs_data_chat_template(tokenizer, tmp_path):
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])
    with pytest.raises(DataError, match="set data.chat_template"):
        encode(bare, path, "chat", on_bad_row="skip")  # a setup error, never skipped
    assert target_runs(bare, encode(bare, path, "chat", chat_template="chatml")[0], 0)[0] == "AB<|im_end|>\n"


def test_completion_and_text_targets(tokenizer, tmp_path):
    completion, _ = encode(tokenizer, write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2=", "completion": "4"}]),
                           "completion")
    assert target_runs(tokenizer, completion, 0) == ["4<|eos|>"]
    text, _ = encode(tokenizer, write_jsonl(tmp_path / "t.jsonl", [{"text": "The river rested."}]), "text")
    assert target_runs(tokenizer, text, 0) == ["The river rested.<|eos|>"]


def test_classification_labels_by_name_index_and_csv_digits(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "good", "label": "pos"}, {"text": "bad", "label": 0}])
    split, _ = encode(tokenizer, path, "classification", labels=["neg", "pos"])
    assert split.class_labels.tolist() == [1, 0] and split.labels is None
    assert tokenizer.decode(split.row(0)[0].tolist()) == "good"
    (tmp_path / "c.csv").write_text("text,label\ngood,1\nbad,0\n")
    assert encode(tokenizer, tmp_path / "c.csv", "classification")[0].class_labels.tolist() == [1, 0]
    write_jsonl(path, [{"text": "good", "label": "pos"}, {"text": "bad", "label": "meh"}])
    with pytest.raises(DataError, match=r"c.jsonl:2: field `label` is 'meh'; expected one of neg, pos"):
        encode(tokenizer, path, "classification", labels=["neg", "pos"])


def test_preference_pairs_as_text_and_as_conversation(tokenizer, tmp_path):
    rows = [{"prompt": "Q: 1+1?\nA: ", "chosen": "2", "rejected": "3"},
            {"prompt": [{"role": "user", "content": "1+1?"}], "chosen": "2",
             "rejected": [{"role": "assistant", "content": "3"}]}]
    split, counts = encode(tokenizer, write_jsonl(tmp_path / "p.jsonl", rows), "preference")
    assert split.num_examples == 2 and split.rows_per_example == 2 and counts.kept == 2
    assert [target_runs(tokenizer, split, r) for r in range(4)] == [
        ["2<|eos|>"], ["3<|eos|>"], ["2<|im_end|>\n"], ["3<|im_end|>\n"]]
    chosen, rejected = (tokenizer.decode(split.row(r)[0].tolist()) for r in (2, 3))
    assert chosen.endswith("<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n2<|im_end|>\n")
    assert rejected.endswith("assistant\n3<|im_end|>\n")


# --------------------------------------------------------------------------- files and bad rows
@pytest.mark.parametrize("row,message", [
    ({"instruction": "x"}, r"bad.jsonl:2: field `output` missing"),
    ({"instruction": 3, "output": "y"}, r"bad.jsonl:2: field `instruction` must be a string, got int"),
    ({"instruction": "  ", "output": "y"}, r"bad.jsonl:2: field `instruction` is empty"),
    (["a list"], r"bad.jsonl:2: expected an object with fields, got list"),
])
def test_bad_alpaca_rows_name_file_line_and_field(tokenizer, tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "ok", "output": "ok"}, row])
    with pytest.raises(DataError, match="(?s)^1 bad row; fix it or set data.on_bad_row: skip.*" + message + "$"):
        encode(tokenizer, path)


def test_unknown_role_and_invalid_json_are_named(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "robot", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"c.jsonl:1: messages\[0\].role is 'robot'; .* data.sources\[\].roles"):
        encode(tokenizer, path, "chat")
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"instruction": "a", "output": "b"}\n{not json}\n')
    with pytest.raises(DataError, match=r"b.jsonl:2: invalid JSON"):
        encode(tokenizer, broken)


def test_invalid_json_names_the_column_in_the_line(tokenizer, tmp_path):
    cut = '{"instruction": "Add 1 and 1.", "output": "2"'  # cut short: the JSON ends at column 45
    broken = tmp_path / "b.jsonl"
    broken.write_text(f'{cut}\n{{"instruction": "a" "output": "b"}}\n')
    with pytest.raises(DataError) as raised:
        encode(tokenizer, broken)
    assert f"b.jsonl:1: invalid JSON (Expecting ',' delimiter at column {len(cut) + 1})" in str(raised.value)
    assert "b.jsonl:2: invalid JSON (Expecting ',' delimiter at column 21)" in str(raised.value)


def test_every_bad_row_is_named_in_one_pass_the_first_20_then_the_count(tokenizer, tmp_path):
    rows = [json.dumps({"instruction": f"q{i}", "output": "a"}) if i % 3 == 0 else
            json.dumps({"instruction": f"q{i}"}) if i % 3 == 1 else "{cut" for i in range(1, 40)]
    path = tmp_path / "many.jsonl"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError) as raised:
        encode(tokenizer, path)
    message = str(raised.value)
    assert message.startswith("26 bad rows; fix them or set data.on_bad_row: skip")
    named = [line for line in message.splitlines() if "many.jsonl:" in line]
    bad_lines = [n for n in range(1, 40) if n % 3]
    assert [line.split("many.jsonl:")[1].split(":")[0] for line in named] == [str(n) for n in bad_lines[:20]]
    assert "many.jsonl:1: field `output` missing" in message and "many.jsonl:5: invalid JSON" in message
    assert message.splitlines()[-1].strip() == "... and 6 more (26 bad rows in all)"


@pytest.mark.parametrize("index", [0, 1])
def test_chat_rows_without_messages_point_at_the_fields_mapping(tokenizer, tmp_path, index):
    good = write_jsonl(tmp_path / "good.jsonl", [{"messages": CHAT}])
    path = write_jsonl(tmp_path / "conv.jsonl", [{"id": 7, "tags": ["x"], "conversation": CHAT}])
    chat = [DataSource(path=str(good), format="chat") for _ in range(2)]
    chat[index] = DataSource(path=str(path), format="chat")
    cfg = DataConfig(sources=chat, max_seq_len=128)
    with pytest.raises(DataError) as raised:
        encode_source(cfg.sources[index], cfg, tokenizer)
    assert ("conv.jsonl:1: field `messages` must be a non-empty list of messages; the row has a list field "
            f"`conversation`: map it with data.sources[{index}].fields: {{messages: conversation}}"
            ) in str(raised.value)
    no_lists = write_jsonl(tmp_path / "plain.jsonl", [{"id": 7, "text": "hi"}])
    with pytest.raises(DataError) as raised:
        encode(tokenizer, no_lists, "chat")
    assert "plain.jsonl:1: field `messages` must be a non-empty list of messages" in str(raised.value)
    assert "map it with" not in str(raised.value)


def test_json_csv_and_parquet_rows_are_named_by_row(tokenizer, tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "a"}]))
    with pytest.raises(DataError, match=r"a.json: row 2: field `output` missing"):
        encode(tokenizer, tmp_path / "a.json")
    (tmp_path / "a.csv").write_text("instruction,output\na,b\nc,\n")
    with pytest.raises(DataError, match=r"a.csv:3: field `output` is empty"):
        encode(tokenizer, tmp_path / "a.csv")
    pq.write_table(pa.table({"instruction": ["a", "c"], "output": ["b", None]}), tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"a.parquet: row 2: field `output` missing"):
        encode(tokenizer, tmp_path / "a.parquet")


def test_skipped_rows_are_counted_with_examples(tokenizer, tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{broken\n{"instruction": "c"}\n'
                    '{"instruction": "d", "output": "e"}\n')
    split, counts = encode(tokenizer, path, on_bad_row="skip")
    assert (len(split), counts.read, counts.kept, counts.skipped) == (2, 4, 2, 2)
    assert "mixed.jsonl:2: invalid JSON" in counts.bad_rows[0] and "mixed.jsonl:3: field `output`" in counts.bad_rows[1]


def test_a_folder_source_reads_every_supported_file_in_order(tokenizer, tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"instruction": "b", "output": "2"}])
    (tmp_path / "a.csv").write_text("instruction,output\na,1\n")
    (tmp_path / "notes.txt").write_text("ignored")
    split, _ = encode(tokenizer, tmp_path)
    assert [target_runs(tokenizer, split, i) for i in range(2)] == [["1<|eos|>"], ["2<|eos|>"]]


def test_a_hub_dataset_source_is_read_and_hashed_through_datasets(tokenizer, monkeypatch):
    import datasets

    rows = datasets.Dataset.from_list([{"question": "2+2=", "answer": "4"}, {"question": "1+1="}])
    monkeypatch.setattr(sources, "load_hub_dataset", lambda source: rows)  # tests never reach the hub
    source = DataSource(dataset="someone/math", split="test", format="completion",
                        fields={"prompt": "question", "completion": "answer"})
    with pytest.raises(DataError, match=r"someone/math\[test\]: row 2: field `answer` missing"):
        encode(tokenizer, None, source=source)
    first = sources.source_digest(source)
    monkeypatch.setattr(sources, "load_hub_dataset", lambda source: rows.select([0]))
    assert sources.source_digest(source) != first  # the dataset fingerprint changed
    assert encode(tokenizer, None, source=source)[1].kept == 1


def test_overlong_rows_are_truncated_or_dropped_and_counted(tokenizer, tmp_path):
    rows = [{"instruction": "word " * 50, "output": "y"}, {"instruction": "a", "output": "long " * 50}]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    split, counts = encode(tokenizer, path, max_seq_len=40)  # the second row's prompt is 29 tokens
    # The first row loses its response to truncation, so it has no target left and is dropped.
    assert (len(split), counts.truncated, counts.dropped) == (1, 2, 1) and len(split.row(0)[0]) == 40
    split, counts = encode(tokenizer, path, max_seq_len=40, overlong="drop", on_bad_row="skip")
    assert (len(split), counts.truncated, counts.dropped) == (0, 0, 2)


# --------------------------------------------------------------------------- the data section of a recipe
@pytest.mark.parametrize("data,message", [
    ({"sources": [{"path": "/a.jsonl", "dataset": "x/y"}]}, "set exactly one of path"),
    ({"sources": [{"path": "/a.jsonl", "split": "test"}]}, "split: only used by `dataset` sources"),
    ({"sources": [{"path": "/a.jsonl", "fields": {"output": "answer", "turns": "x"}}]},
     "fields: turns not read by format alpaca"),
    ({"sources": [{"path": "/a.jsonl", "format": "chat", "roles": {"human": "person"}}]}, "roles: person"),
    ({"sources": [{"path": "/a.jsonl"}, {"path": "/b.jsonl", "format": "preference"}]}, "mix formats"),
    ({"sources": [{"path": "/a.jsonl", "format": "preference"}], "packing": True}, "data.packing works with sft"),
    ({"sources": [{"path": "/a.jsonl"}], "labels": ["a", "b"]}, "data.labels names classes"),
])
def test_data_config_rejects_contradictions_naming_the_key(data, message):
    with pytest.raises(ValidationError, match=message):
        DataConfig(**data)


def test_the_data_must_fit_the_task_and_objective():
    sft = DataConfig(sources=[{"path": "/a.jsonl"}])
    pairs = DataConfig(sources=[{"path": "/a.jsonl", "format": "preference"}])
    classes = DataConfig(sources=[{"path": "/a.csv", "format": "classification"}], labels=["a", "b", "c"])
    assert sft.objective_problems(task="causal_lm", objective="sft", num_labels=None) == []
    assert pairs.objective_problems(task="causal_lm", objective="dpo", num_labels=None) == []
    assert "needs preference rows, these are alpaca/chat/completion/text" in \
        sft.objective_problems(task="causal_lm", objective="dpo", num_labels=None)[0]
    assert classes.objective_problems(task="sequence_classification", objective="sft", num_labels=2) == [
        "data.labels: 3 names but model.num_labels is 2"]
    assert classes.objective_problems(task="sequence_classification", objective="dpo", num_labels=3)[0].startswith(
        "method.objective:")
