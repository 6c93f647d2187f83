"""Rows -> token ids with loss masks -> a cache on disk -> batches.

Tokenization happens once, on the driver, before any worker starts; the result
is a folder of flat numpy arrays keyed by a content hash of (source files,
format options, tokenizer), which workers memory-map. The sampler draws the
global batch of step ``s`` from a per-epoch seeded permutation, so the sequence
of global batches does not depend on the number of workers, and resuming at
step ``s`` needs nothing but ``s``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tunefleet.launcher.errors import DataError
from tunefleet.launcher.recipe import DataConfig, DataSource

IGNORE_INDEX = -100
CACHE_VERSION = "1"
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
_ROLES = {"system", "user", "assistant"}


# --------------------------------------------------------------------------- reading
def read_rows(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, row) for a JSONL file, or (index + 1, row) for a JSON list."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{path}: data file not found; fix data.sources[].path")
    if file.suffix == ".json":
        try:
            rows = json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: a .json data file must hold a list of objects")
        yield from enumerate(rows, start=1)
        return
    with file.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{line_no}: invalid JSON ({exc.msg})") from None


def _field(row: dict, name: str, where: str, *, required: bool = True) -> str:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    value = row.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        problem = "missing" if value is None else f"must be a string, got {type(value).__name__}"
        raise DataError(f"{where}: field `{name}` {problem}")
    if required and not value.strip():
        raise DataError(f"{where}: field `{name}` is empty")
    return value


# --------------------------------------------------------------------------- formats
def alpaca_segments(row: dict, where: str, eos: str) -> list[tuple[str, bool]]:
    """[(text, is_target)] for an instruction/input/output row."""
    instruction = _field(row, "instruction", where)
    extra = _field(row, "input", where, required=False)
    output = _field(row, "output", where)
    template = ALPACA_PROMPT_WITH_INPUT if extra.strip() else ALPACA_PROMPT
    return [(template.format(instruction=instruction, input=extra), False), (output + eos, True)]


def chat_segments(row: dict, where: str, tokenizer) -> list[tuple[str, bool]]:
    """[(text, is_target)] for a chat row: only assistant replies are targets."""
    messages = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field `messages` must be a non-empty list of {{role, content}}")
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in _ROLES:
            raise DataError(f"{where}: messages[{i}].role is {role!r}; use one of {sorted(_ROLES)}")
        _field(message, "content", f"{where}: messages[{i}]")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be from the assistant")

    def render(upto: int, generation_prompt: bool = False) -> str:
        if upto == 0 and not generation_prompt:
            return ""
        return tokenizer.apply_chat_template(
            messages[:upto], tokenize=False, add_generation_prompt=generation_prompt
        )

    segments, rendered = [], ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            header = render(i, generation_prompt=True)
            segments.append((header[len(rendered):], False))
            rendered = header
        full = render(i + 1)
        if not full.startswith(rendered):
            raise DataError(f"{where}: the chat template does not render conversations prefix by prefix")
        segments.append((full[len(rendered):], message["role"] == "assistant"))
        rendered = full
    return segments


def row_segments(source: DataSource, row: dict, where: str, tokenizer) -> list[tuple[str, bool]]:
    if source.format == "alpaca":
        return alpaca_segments(row, where, tokenizer.eos_token or "")
    if source.format == "chat":
        return chat_segments(row, where, tokenizer)
    if source.format == "completion":
        return [(_field(row, "prompt", where), False), (_field(row, "completion", where) + tokenizer.eos_token, True)]
    return [(_field(row, "text", where) + (tokenizer.eos_token or ""), True)]


# --------------------------------------------------------------------------- tokenizing
@dataclass(frozen=True)
class TokenizedSplit:
    """Flat token/label arrays with row offsets; rows are ``ids[offsets[i]:offsets[i+1]]``."""

    input_ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    num_truncated: int = 0

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = self.offsets[index], self.offsets[index + 1]
        return self.input_ids[start:end], self.labels[start:end]

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])


def tokenize_rows(rows: list[list[tuple[str, bool]]], tokenizer, max_seq_len: int, train_on_prompt: bool):
    texts = [text for segments in rows for text, _ in segments]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids_out, labels_out, lengths, truncated, cursor = [], [], [], 0, 0
    for segments in rows:
        ids, labels = list(bos), [IGNORE_INDEX] * len(bos)
        for _, is_target in segments:
            piece = encoded[cursor]
            cursor += 1
            ids.extend(piece)
            labels.extend(piece if is_target or train_on_prompt else [IGNORE_INDEX] * len(piece))
        if len(ids) > max_seq_len:
            truncated += 1
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        ids_out.extend(ids)
        labels_out.extend(labels)
        lengths.append(len(ids))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return TokenizedSplit(np.asarray(ids_out, np.int32), np.asarray(labels_out, np.int32), offsets, truncated)


def load_split(sources: list[DataSource], tokenizer, cfg: DataConfig) -> TokenizedSplit:
    rows = []
    for source in sources:
        for line_no, row in read_rows(source.path):
            rows.append(row_segments(source, row, f"{source.path}:{line_no}", tokenizer))
    if not rows:
        raise DataError(f"{', '.join(s.path for s in sources)}: no rows; add data or fix data.sources")
    return tokenize_rows(rows, tokenizer, cfg.max_seq_len, cfg.train_on_prompt)


# --------------------------------------------------------------------------- cache
def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_key(cfg: DataConfig, tokenizer_dir: str) -> str:
    digest = hashlib.sha256(CACHE_VERSION.encode())
    spec = cfg.model_dump(mode="json", exclude={"cache_dir"})
    digest.update(json.dumps(spec, sort_keys=True).encode())
    for source in cfg.sources + ([cfg.eval] if cfg.eval and cfg.eval.path else []):
        digest.update(_file_digest(source.path).encode())
    for name in sorted(os.listdir(tokenizer_dir)):
        if "token" in name or name in ("special_tokens_map.json", "chat_template.jinja"):
            digest.update(name.encode() + _file_digest(os.path.join(tokenizer_dir, name)).encode())
    return digest.hexdigest()[:20]


def default_cache_dir() -> Path:
    root = os.environ.get("TUNEFLEET_CACHE") or os.path.expanduser("~/.cache/tunefleet")
    return Path(root) / "datasets"


def _save_split(split: TokenizedSplit, folder: Path) -> None:
    folder.mkdir(parents=True)
    for name in ("input_ids", "labels", "offsets"):
        np.save(folder / f"{name}.npy", getattr(split, name))


def _load_split(folder: Path) -> TokenizedSplit:
    arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in ("input_ids", "labels", "offsets")}
    return TokenizedSplit(**arrays)


def prepare(cfg: DataConfig, tokenizer, tokenizer_dir: str, seed: int) -> Path:
    """Tokenize train (and eval) once into the cache; return the cache folder."""
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    target = cache / cache_key(cfg, tokenizer_dir)
    if (target / "meta.json").is_file():
        return target
    train = load_split(cfg.sources, tokenizer, cfg)
    evaluation = None
    if cfg.eval and cfg.eval.path:
        evaluation = load_split([cfg.sources[0].model_copy(update={"path": cfg.eval.path})], tokenizer, cfg)
    elif cfg.eval and cfg.eval.fraction:
        train, evaluation = _split_fraction(train, cfg.eval.fraction, seed)
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache))
    _save_split(train, staging / "train")
    if evaluation is not None:
        _save_split(evaluation, staging / "eval")
    meta = {"train_rows": len(train), "train_tokens": train.num_tokens, "truncated": train.num_truncated,
            "eval_rows": len(evaluation) if evaluation else 0}
    (staging / "meta.json").write_text(json.dumps(meta))
    try:
        staging.rename(target)
    except OSError:  # another process finished the same cache first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _split_fraction(split: TokenizedSplit, fraction: float, seed: int) -> tuple[TokenizedSplit, TokenizedSplit]:
    order = np.random.default_rng(seed).permutation(len(split))
    num_eval = max(1, int(len(split) * fraction))
    return _take(split, np.sort(order[num_eval:])), _take(split, np.sort(order[:num_eval]))


def _take(split: TokenizedSplit, indices: np.ndarray) -> TokenizedSplit:
    rows = [split.row(i) for i in indices]
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(ids) for ids, _ in rows], out=offsets[1:])
    return TokenizedSplit(
        np.concatenate([ids for ids, _ in rows]), np.concatenate([lab for _, lab in rows]), offsets
    )


def cache_meta(folder: Path) -> dict:
    return json.loads((Path(folder) / "meta.json").read_text())


def open_split(folder: Path, name: str) -> TokenizedSplit | None:
    path = Path(folder) / name
    return _load_split(path) if path.is_dir() else None


# --------------------------------------------------------------------------- batching
def global_batch_indices(num_rows: int, step: int, global_batch: int, seed: int) -> np.ndarray:
    """Row indices of the global batch at ``step``: a seeded permutation per epoch."""
    start = step * global_batch
    out = []
    while len(out) < global_batch:
        epoch, offset = divmod(start + len(out), num_rows)
        order = np.random.default_rng([seed, epoch]).permutation(num_rows)
        out.extend(order[offset : offset + global_batch - len(out)].tolist())
    return np.asarray(out, dtype=np.int64)


def rank_micro_batches(
    split: TokenizedSplit, step: int, *, rank: int, world_size: int, micro_batch_size: int,
    grad_accum_steps: int, seed: int, pad_id: int,
) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches of the global batch at ``step`` (rank-strided)."""
    per_rank = micro_batch_size * grad_accum_steps
    indices = global_batch_indices(len(split), step, per_rank * world_size, seed)
    mine = indices[rank::world_size]
    return [collate([split.row(i) for i in mine[m : m + micro_batch_size]], pad_id)
            for m in range(0, per_rank, micro_batch_size)]


def eval_batches(split: TokenizedSplit, *, rank: int, world_size: int, batch_size: int,
                 max_rows: int | None, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Every rank gets the same number of batches (sharded models run collectives)."""
    num_rows = min(len(split), max_rows or len(split))
    mine = list(range(rank, num_rows, world_size))
    rows_per_rank = -(-num_rows // world_size)
    num_batches = -(-rows_per_rank // batch_size)
    return [collate([split.row(i) for i in mine[b * batch_size:(b + 1) * batch_size]], pad_id)
            for b in range(num_batches)]


def collate(rows: list[tuple[np.ndarray, np.ndarray]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row; no rows gives one all-ignored pad token (keeps ranks in step)."""
    rows = rows or [(np.asarray([pad_id], np.int32), np.asarray([IGNORE_INDEX], np.int32))]
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, labs) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        labels[i, : len(labs)] = torch.from_numpy(np.asarray(labs, dtype=np.int64))
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
