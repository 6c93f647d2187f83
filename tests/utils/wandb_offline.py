"""Read W&B offline run files (``run-<id>.wandb``): a LevelDB-style log of
protobuf ``Record`` messages in 32 KiB blocks after a 7-byte ``:W&B`` header."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
FILE_HEADER = struct.Struct("<4sHB")  # ident ":W&B", magic, version
RECORD_HEADER = struct.Struct("<IHB")  # crc32c, length, type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _chunks(data: bytes) -> Iterator[tuple[int, bytes]]:
    offset = FILE_HEADER.size
    while offset + RECORD_HEADER.size <= len(data):
        left_in_block = BLOCK - offset % BLOCK
        if left_in_block < RECORD_HEADER.size:
            offset += left_in_block
            continue
        _, length, kind = RECORD_HEADER.unpack_from(data, offset)
        offset += RECORD_HEADER.size
        if kind == 0 and length == 0:
            return
        yield kind, data[offset:offset + length]
        offset += length


def records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    assert FILE_HEADER.unpack_from(data)[0] == b":W&B", f"{path} is not a W&B run file"
    pending = b""
    for kind, chunk in _chunks(data):
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def history_steps(wandb_dir: Path) -> dict[str, list[int]]:
    """Run id -> history steps logged, across every offline run folder, in time order."""
    steps: dict[str, list[int]] = {}
    for run_dir in sorted(wandb_dir.glob("offline-run-*")):
        for path in run_dir.glob("run-*.wandb"):
            run_id = path.stem.removeprefix("run-")
            for record in records(path):
                if record.WhichOneof("record_type") == "history":
                    steps.setdefault(run_id, []).append(record.history.step.num)
    return steps


def history_keys(wandb_dir: Path) -> set[str]:
    """Every metric key logged to history, across every offline run folder."""
    keys = set()
    for path in wandb_dir.glob("offline-run-*/run-*.wandb"):
        for record in records(path):
            if record.WhichOneof("record_type") == "history":
                keys.update(item.key or "/".join(item.nested_key) for item in record.history.item)
    return keys
