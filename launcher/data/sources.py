"""Where rows come from: local JSONL / JSON / Parquet / CSV files, folders of
them, and Hugging Face datasets.

Every row arrives with where it was read (``file:line`` for JSONL and CSV,
``file: row N`` otherwise) so that a bad row can be named exactly. A JSONL line
that is not valid JSON arrives as a ``BadRow`` in place of the row, so that
``data.on_bad_row: skip`` can skip it like any other bad row.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunefleet.launcher.config import DataConfig, DataSource
from tunefleet.launcher.errors import DataError, Problem

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


class BadRow(DataError):
    """One row that cannot be used; ``data.on_bad_row: skip`` skips these (and only these)."""


Located = tuple[str, Any]  # (where, row) where row is a dict, or a BadRow for an unreadable line


def source_files(path: str) -> list[Path]:
    """The file itself, or every supported file under a folder (recursively, in path order)."""
    root = Path(path)
    if root.is_dir():
        files = sorted(f for f in root.rglob("*") if f.suffix in SUFFIXES and f.is_file()
                       and not any(part.startswith(".") for part in f.relative_to(root).parts))
        if not files:
            raise DataError(f"{path}: the folder holds no {'/'.join(SUFFIXES)} files; fix the path")
        return files
    if not root.is_file():
        raise DataError(f"{path}: not found; fix the path")
    if root.suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type; use one of {', '.join(SUFFIXES)}")
    return [root]


def path_problems(cfg: DataConfig) -> list[Problem]:
    """Local sources and eval files that cannot be read, keyed by recipe key (datasets are checked on load)."""
    paths = [(f"data.sources.{i}.path", s.path) for i, s in enumerate(cfg.sources) if s.path is not None]
    if cfg.eval:
        paths += [(f"data.eval.{key}", path) for key in ("path", "reference_data")
                  if (path := getattr(cfg.eval, key)) is not None]
    problems = []
    for key, path in paths:
        try:
            source_files(path)
        except DataError as exc:
            problems.append(Problem(key, str(exc)))
    return problems


def read_source(source: DataSource) -> Iterator[Located]:
    """Every row of a source with its location, in a fixed order."""
    if source.dataset is not None:
        for index, row in enumerate(load_hub_dataset(source), start=1):
            yield f"{source.display_name}: row {index}", row
        return
    for file in source_files(source.path):
        yield from _READERS[file.suffix](file)


def _read_jsonl(file: Path) -> Iterator[Located]:
    with file.open(encoding="utf-8") as handle:
        for line_no, raw in enumerate(handle, start=1):
            line = raw.rstrip("\n")  # with the newline, a row cut short fails at column 1 of the next line
            if not line.strip():
                continue
            where = f"{file}:{line_no}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as exc:
                yield where, BadRow(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})")


def _read_json(file: Path) -> Iterator[Located]:
    try:
        rows = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{file}:{exc.lineno}: invalid JSON ({exc.msg}); fix the file") from None
    if not isinstance(rows, list):
        raise DataError(f"{file}: a .json data file must hold a list of objects (use .jsonl for one per line)")
    for index, row in enumerate(rows, start=1):
        yield f"{file}: row {index}", row


def _read_parquet(file: Path) -> Iterator[Located]:
    import pyarrow.parquet as pq

    index = 0
    for batch in pq.ParquetFile(file).iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            index += 1
            yield f"{file}: row {index}", row


def _read_csv(file: Path) -> Iterator[Located]:
    with file.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            yield f"{file}:{reader.line_num}", row


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet, ".csv": _read_csv}


def load_hub_dataset(source: DataSource):
    """The split of a Hugging Face dataset (downloaded once into the `datasets` cache)."""
    import datasets

    try:
        return datasets.load_dataset(source.dataset, source.name, split=source.split, revision=source.revision)
    except (FileNotFoundError, ValueError, ConnectionError) as exc:
        raise DataError(f"{source.display_name}: cannot load the dataset ({exc}); check data.sources[].dataset, "
                        "name and split, and network access") from None


def source_digest(source: DataSource) -> str:
    """Changes whenever the source's content does: every file's name and bytes, or the dataset fingerprint."""
    digest = hashlib.sha256()
    if source.dataset is not None:
        digest.update(load_hub_dataset(source)._fingerprint.encode())
        return digest.hexdigest()
    root = Path(source.path)
    for file in source_files(source.path):
        digest.update(str(file.relative_to(root) if root.is_dir() else file.name).encode() + b"\0")
        digest.update(file_digest(file).encode())
    return digest.hexdigest()


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
