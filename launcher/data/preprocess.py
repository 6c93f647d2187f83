"""Preprocessing: sources -> tokens with loss masks -> one cache folder, once.

The cache folder is named by a hash of everything that decides its content:
every source file's bytes (every file of a folder source), the data options,
the tokenizer files and, when it matters, the seed. A second launch finds the
folder and skips all work; a changed source file gives a new folder.

Steps: read rows, format them into examples (``formats.py``), tokenize with
masks (batched; ``data.num_proc`` processes), apply ``data.overlong`` and
``data.on_bad_row``, hold out the eval fraction per source, mix sources by
``weight`` (source ``i`` contributes ``round(weight_i * rows_i)`` rows to every
epoch: whole copies plus a seeded subset, fixed here), pack (``packing.py``),
and write. ``prepare_on_ray`` runs this as one Ray task on the driver's node
before any worker starts; ``prepare`` runs it in-process (``tunefleet
preprocess``); workers only memory-map the result.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tunefleet.launcher.config import DataConfig, DataSource
from tunefleet.launcher.data.batches import TokenizedSplit, cache_meta, concat
from tunefleet.launcher.data.formats import Example, Pair, PromptExample, RowFormatter
from tunefleet.launcher.data.packing import pack, packing_efficiency
from tunefleet.launcher.data.sources import BadRow, Located, file_digest, read_source, source_digest
from tunefleet.launcher.errors import DataError
from tunefleet.launcher.model.inputs import IGNORE_INDEX

CACHE_VERSION = "3"  # 3: prompt rows keep their other fields
CHUNK_ROWS = 2048
NUM_NAMED_BAD_ROWS = 20  # errors and reports name this many bad rows, then give the count


@dataclass
class Counts:
    """What happened to the rows of one source; ``bad_rows`` names the first of the ``skipped`` ones."""

    read: int = 0
    kept: int = 0
    skipped: int = 0
    truncated: int = 0
    dropped: int = 0
    bad_rows: list[str] = field(default_factory=list)

    def add(self, other: Counts) -> None:
        for name in ("read", "kept", "skipped", "truncated", "dropped"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.bad_rows = (self.bad_rows + other.bad_rows)[:NUM_NAMED_BAD_ROWS]


def named_bad_rows(bad_rows: list[str], num_bad: int) -> list[str]:
    """Lines naming the first bad rows (``file:line: reason``), then how many there are in all."""
    lines = [f"  - {reason}" for reason in bad_rows]
    if num_bad > len(bad_rows):
        lines.append(f"  ... and {num_bad - len(bad_rows):,} more ({_bad_rows(num_bad)} in all)")
    return lines


def skipped_lines(meta: dict) -> list[str]:
    """The rows ``data.on_bad_row: skip`` left out, as preprocess and launch print them (none: no lines)."""
    if not meta.get("skipped"):
        return []
    return [f"skipped {_bad_rows(meta['skipped'])} (data.on_bad_row: skip):",
            *named_bad_rows(meta.get("skipped_examples", []), meta["skipped"])]


def _bad_rows(num: int) -> str:
    return "1 bad row" if num == 1 else f"{num:,} bad rows"


Encoded = tuple[TokenizedSplit, Counts]  # one source's rows, tokenized, and what happened to them


# --------------------------------------------------------------------------- tokenizing
def encode_chunk(formatter: RowFormatter, cfg: DataConfig, chunk: list[Located]) -> tuple[TokenizedSplit, Counts]:
    """Format and tokenize rows; bad rows are counted and named (raising is the caller's, once for all rows)."""
    counts, examples = Counts(read=len(chunk)), []
    for where, row in chunk:
        try:
            if isinstance(row, BadRow):
                raise row
            examples.append(formatter(row, where))
        except BadRow as exc:
            counts.skipped += 1
            if len(counts.bad_rows) < NUM_NAMED_BAD_ROWS:
                counts.bad_rows.append(str(exc))
    groups = [_sequences(example) for example in examples]
    encoded = iter(_encode([seq for group in groups for seq in group], formatter.tokenizer, cfg))
    rows, classes = [], [] if cfg.kind == "classification" else None
    fields = [] if cfg.kind == "prompt" else None
    for example, group in zip(examples, groups, strict=True):
        fitted = _fit_to_length([next(encoded) for _ in group], cfg, counts)
        if fitted is not None:
            rows.extend(fitted)
            if classes is not None:
                classes.append(example[1])
            if fields is not None:
                fields.append(json.dumps(example.fields, ensure_ascii=False, default=str))
    rows_per_example = 2 if cfg.kind == "preference" else 1
    counts.kept = len(rows) // rows_per_example
    return _to_split(rows, classes, rows_per_example, fields), counts


def _sequences(example: Example) -> list:
    """What to tokenize for an example: its segment lists (a pair: both responses after the prompt)."""
    if isinstance(example, Pair):
        return [example.prompt + example.chosen, example.prompt + example.rejected]
    return [example.segments if isinstance(example, PromptExample) else example]


def _encode(sequences: list, tokenizer, cfg: DataConfig) -> list[tuple[list[int], list[int] | None]]:
    """(ids, labels) per sequence; labels are None for classification texts."""
    if cfg.kind == "classification":
        encoded = tokenizer([text for text, _ in sequences], add_special_tokens=True)["input_ids"] if sequences else []
        return [(ids, None) for ids in encoded]
    texts = [text for segments in sequences for text, _ in segments]
    pieces = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    bos_id, bos = tokenizer.bos_token_id, tokenizer.bos_token
    out = []
    for segments in sequences:
        starts_with_bos = bos_id is not None and not (bos and segments[0][0].startswith(bos))
        ids, labels = ([bos_id], [IGNORE_INDEX]) if starts_with_bos else ([], [])
        for _, is_target in segments:
            piece = next(pieces)
            ids.extend(piece)
            labels.extend(piece if is_target or cfg.train_on_prompt else [IGNORE_INDEX] * len(piece))
        out.append((ids, labels))
    return out


def _fit_to_length(sequences: list, cfg: DataConfig, counts: Counts) -> list | None:
    """Apply ``data.overlong`` to an example's sequences; None drops it (also when no target is left)."""
    limit = cfg.max_seq_len
    if any(len(ids) > limit for ids, _ in sequences):
        if cfg.overlong == "drop":
            counts.dropped += 1
            return None
        counts.truncated += 1
        sequences = [(ids[:limit], None if labels is None else labels[:limit]) for ids, labels in sequences]
    if any(labels is not None and all(t == IGNORE_INDEX for t in labels[1:]) for _, labels in sequences):
        counts.dropped += 1
        return None
    return sequences


def _to_split(rows: list, classes: list[int] | None, rows_per_example: int,
              fields: list[str] | None) -> TokenizedSplit:
    flat_ids = [t for ids, _ in rows for t in ids]
    labels = None if classes is not None else np.asarray([t for _, labs in rows for t in labs], np.int32)
    blobs = None if fields is None else [text.encode() for text in fields]
    return TokenizedSplit(np.asarray(flat_ids, np.int32), labels, _offsets([len(ids) for ids, _ in rows]),
                          class_labels=None if classes is None else np.asarray(classes, np.int64),
                          rows_per_example=rows_per_example,
                          fields=None if blobs is None else np.frombuffer(b"".join(blobs), np.uint8).copy(),
                          field_offsets=None if blobs is None else _offsets([len(blob) for blob in blobs]))


def _offsets(lengths: list[int]) -> np.ndarray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


_worker_state: tuple[RowFormatter, DataConfig] | None = None


def _init_worker(formatter: RowFormatter, cfg: DataConfig) -> None:
    global _worker_state
    _worker_state = (formatter, cfg)


def _encode_in_worker(chunk: list[Located]) -> tuple[TokenizedSplit, Counts]:
    return encode_chunk(*_worker_state, chunk)


def encode_source(source: DataSource, cfg: DataConfig, tokenizer) -> tuple[TokenizedSplit, Counts]:
    """Every row of one source, tokenized; with ``data.on_bad_row: error``, every bad row in one error."""
    encoded = _encode_source(source, cfg, tokenizer)
    _raise_bad_rows(cfg, [encoded[1]])
    return encoded


def _encode_source(source: DataSource, cfg: DataConfig, tokenizer) -> tuple[TokenizedSplit, Counts]:
    """Every row of one source, tokenized (in ``data.num_proc`` processes for more than one chunk).

    The processes are forked: they start at once and inherit the formatter, where
    spawned ones re-import torch and transformers first (tens of seconds on a
    busy machine); they only format and tokenize, never touching Ray or torch.
    """
    formatter = RowFormatter(source, cfg, tokenizer)
    located = list(read_source(source))
    chunks = [located[i : i + CHUNK_ROWS] for i in range(0, len(located), CHUNK_ROWS)] or [[]]
    if cfg.num_proc == 1 or len(chunks) == 1:
        parts = [encode_chunk(formatter, cfg, chunk) for chunk in chunks]
    else:
        with ProcessPoolExecutor(min(cfg.num_proc, len(chunks)), mp_context=multiprocessing.get_context("fork"),
                                 initializer=_init_worker, initargs=(formatter, cfg)) as pool:
            parts = list(pool.map(_encode_in_worker, chunks))
    counts = Counts()
    for _, part_counts in parts:
        counts.add(part_counts)
    return concat([split for split, _ in parts]), counts


# --------------------------------------------------------------------------- splitting and mixing
def _hold_out(split: TokenizedSplit, fraction: float, seed: list[int]) -> tuple[TokenizedSplit, TokenizedSplit]:
    order = np.random.default_rng(seed).permutation(split.num_examples)
    num_eval = max(1, int(split.num_examples * fraction))
    return split.take(np.sort(order[num_eval:])), split.take(np.sort(order[:num_eval]))


def _mix(split: TokenizedSplit, weight: float, seed: list[int]) -> TokenizedSplit:
    """``round(weight * examples)`` examples: whole copies, then a seeded subset without repeats."""
    num = split.num_examples
    if weight == 1.0 or num == 0:
        return split
    copies, rest = divmod(max(1, round(weight * num)), num)
    subset = np.sort(np.random.default_rng(seed).choice(num, rest, replace=False))
    return split.take(np.concatenate([np.tile(np.arange(num), copies), subset]))


def build_splits(cfg: DataConfig, tokenizer, seed: int) -> tuple[dict[str, TokenizedSplit], dict]:
    """({train, eval, reference} splits, those present; meta): everything ``prepare`` writes."""
    encoded, held_out = _encode_all(cfg, tokenizer)
    parts = [split for split, _ in encoded]
    evaluation = held_out["eval"][0] if "eval" in held_out else None
    reference = held_out["reference"][0] if "reference" in held_out else None
    if cfg.eval and cfg.eval.fraction:
        held = [_hold_out(split, cfg.eval.fraction, [seed, i]) for i, split in enumerate(parts)]
        parts, evaluation = [t for t, _ in held], concat([e for _, e in held])
    mixed = [_mix(split, source.weight, [seed, i])
             for i, (split, source) in enumerate(zip(parts, cfg.sources, strict=True))]
    train = concat(mixed)
    _check_not_empty(train, evaluation)
    if cfg.packing:
        train = pack(train, cfg.max_seq_len)
        evaluation = pack(evaluation, cfg.max_seq_len) if evaluation is not None else None
    sources = [{"source": s.display_name, **asdict(c), "epoch_rows": m.num_examples}
               for s, (_, c), m in zip(cfg.sources, encoded, mixed, strict=True)]
    for name, (_, counts) in held_out.items():
        path = cfg.eval.path if name == "eval" else cfg.eval.reference_data
        sources.append({"source": f"{path} ({name})", **asdict(counts), "epoch_rows": 0})
    meta = _meta(cfg, train, evaluation, sources, sum(m.num_examples for m in mixed))
    if reference is not None:
        meta.update(reference_rows=reference.num_examples, reference_tokens=reference.num_tokens)
    splits = {"train": train, "eval": evaluation, "reference": reference}
    return {name: split for name, split in splits.items() if split is not None}, meta


def _encode_all(cfg: DataConfig, tokenizer) -> tuple[list[Encoded], dict[str, Encoded]]:
    """Every source, then the eval file and reference text ({"eval"/"reference": encoded}), checked together.

    All of them are read before any check, so one error names the bad rows of
    every file; a source left without rows is named with the reasons its rows
    were skipped.
    """
    encoded = [_encode_source(source, cfg, tokenizer) for source in cfg.sources]
    held_out = {}
    if cfg.eval and cfg.eval.path:
        eval_source = cfg.sources[0].model_copy(update={"path": cfg.eval.path, "dataset": None, "weight": 1.0})
        held_out["eval"] = _encode_source(eval_source, cfg, tokenizer)
    if cfg.eval and cfg.eval.reference_data:
        held_out["reference"] = _encode_reference(cfg, tokenizer)
    _raise_bad_rows(cfg, [counts for _, counts in encoded + list(held_out.values())])
    _check_sources_not_empty(cfg, encoded)
    if "reference" in held_out and held_out["reference"][0].num_examples == 0:
        raise DataError(f"data.eval.reference_data: no rows left in {cfg.eval.reference_data}; "
                        "point it at a non-empty text file")
    return encoded, held_out


def _encode_reference(cfg: DataConfig, tokenizer) -> Encoded:
    """``data.eval.reference_data`` as unpacked `text` rows, every token a target (for its perplexity)."""
    source = DataSource(path=cfg.eval.reference_data, format="text")
    return _encode_source(source, cfg.model_copy(update={"sources": [source], "train_on_prompt": False}), tokenizer)


def _raise_bad_rows(cfg: DataConfig, counts: list[Counts]) -> None:
    """With ``data.on_bad_row: error``, one error naming the first bad rows of all ``counts``, and their number."""
    total = Counts()
    for part in counts:
        total.add(part)
    if cfg.on_bad_row == "error" and total.skipped:
        them = "it" if total.skipped == 1 else "them"
        raise DataError("\n".join([f"{_bad_rows(total.skipped)}; fix {them} or set data.on_bad_row: skip to "
                                   f"leave {them} out:", *named_bad_rows(total.bad_rows, total.skipped)]))


def _check_sources_not_empty(cfg: DataConfig, encoded: list[Encoded]) -> None:
    """Every source left without rows (bad and skipped, too long, or none at all), with its reasons."""
    lines = []
    for i, (source, (_, counts)) in enumerate(zip(cfg.sources, encoded, strict=True)):
        if counts.kept == 0:
            lines.append(f"no training rows left in data.sources[{i}] ({source.display_name}): {counts.read} read, "
                         f"{counts.skipped} skipped, {counts.dropped} dropped"
                         + ("; first reasons:" if counts.bad_rows else ""))
            lines += named_bad_rows(counts.bad_rows, counts.skipped)
    if lines:
        raise DataError("\n".join(lines + ["fix the rows (or the source's fields, format), or check "
                                           "data.max_seq_len and data.overlong"]))


def _check_not_empty(train: TokenizedSplit, evaluation: TokenizedSplit | None) -> None:
    if train.num_examples == 0:  # every source has rows: the eval fraction took them all
        raise DataError("no training rows are left once data.eval.fraction is held out; add data or lower it")
    if evaluation is not None and evaluation.num_examples == 0:
        raise DataError("the eval split has no rows left; fix data.eval or remove it")


def _meta(cfg: DataConfig, train: TokenizedSplit, evaluation: TokenizedSplit | None, sources: list[dict],
          epoch_examples: int) -> dict:
    totals = {name: sum(s[name] for s in sources) for name in ("skipped", "truncated", "dropped")}
    return {
        "version": CACHE_VERSION, "kind": cfg.kind, "packing": cfg.packing, "max_seq_len": cfg.max_seq_len,
        "train_rows": train.num_examples, "train_tokens": train.num_tokens,
        "train_target_tokens": 0 if train.labels is None else int((np.asarray(train.labels) != IGNORE_INDEX).sum()),
        "epoch_examples": epoch_examples,
        "eval_rows": evaluation.num_examples if evaluation is not None else 0,
        "eval_tokens": evaluation.num_tokens if evaluation is not None else 0,
        **totals, "skipped_examples": [e for s in sources for e in s["bad_rows"]][:NUM_NAMED_BAD_ROWS],
        "packing_efficiency": round(packing_efficiency(train, cfg.max_seq_len), 4),
        "sources": [{k: v for k, v in s.items() if k != "bad_rows"} for s in sources],
    }


# --------------------------------------------------------------------------- cache
def cache_key(cfg: DataConfig, tokenizer_dir: str, seed: int) -> str:
    digest = hashlib.sha256(CACHE_VERSION.encode())
    spec = cfg.model_dump(mode="json", exclude={"cache_dir": True, "num_proc": True,
                                                "eval": {"max_rows", "generate", "reference_data"}})
    seeded = (cfg.eval and cfg.eval.fraction) or any(s.weight != 1.0 for s in cfg.sources)
    digest.update(json.dumps({"data": spec, "seed": seed if seeded else None}, sort_keys=True).encode())
    eval_sources = [DataSource(path=cfg.eval.path)] if cfg.eval and cfg.eval.path else []
    for source in cfg.sources + eval_sources:
        digest.update(source_digest(source).encode())
    if cfg.eval and cfg.eval.reference_data:
        digest.update(b"reference" + source_digest(DataSource(path=cfg.eval.reference_data)).encode())
    for name in sorted(os.listdir(tokenizer_dir)):
        if "token" in name or name in ("special_tokens_map.json", "chat_template.jinja"):
            digest.update(name.encode() + file_digest(os.path.join(tokenizer_dir, name)).encode())
    return digest.hexdigest()[:20]


def cache_folder(cfg: DataConfig, tokenizer_dir: str, seed: int) -> Path:
    root = os.environ.get("TUNEFLEET_CACHE") or os.path.expanduser("~/.cache/tunefleet")
    base = Path(cfg.cache_dir) if cfg.cache_dir else Path(root) / "datasets"
    return base / cache_key(cfg, tokenizer_dir, seed)


def _write(target: Path, splits: dict[str, TokenizedSplit], meta: dict) -> None:
    """Write into a temporary sibling and rename; meta.json last marks the folder complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    for name, split in splits.items():
        split.save(staging / name)
    (staging / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
        staging.rename(target)
    except OSError:  # another process finished the same cache first
        shutil.rmtree(staging, ignore_errors=True)


def prepare(cfg: DataConfig, tokenizer, tokenizer_dir: str, seed: int) -> Path:
    """Tokenize train (eval, reference) into the cache in this process, unless already there; the folder."""
    target = cache_folder(cfg, tokenizer_dir, seed)
    if not (target / "meta.json").is_file():
        _write(target, *build_splits(cfg, tokenizer, seed))
    return target


# --------------------------------------------------------------------------- `tunefleet preprocess`
def preprocess_report(recipe) -> dict:
    """Prepare a recipe's data in this process; the counts, the cache folder and whether it was reused."""
    from tunefleet.launcher.model.modeling import load_tokenizer, resolve_model_path

    model_path = resolve_model_path(recipe.model)
    started = time.perf_counter()
    target = cache_folder(recipe.data, model_path, recipe.train.seed)
    reused = (target / "meta.json").is_file()
    folder = prepare(recipe.data, load_tokenizer(model_path), model_path, recipe.train.seed)
    return {**cache_meta(folder), "cache_dir": str(folder), "reused": reused,
            "seconds": round(time.perf_counter() - started, 2)}
