"""Tokenized data as workers see it: memory-mapped splits, the sampler, batches.

The pipeline: rows (``sources.py``) -> examples of (text, is_target) segments
(``formats.py``) -> token ids with -100 masks, mixed, split and packed
(``preprocess.py``, ``packing.py``) -> a cache folder of flat numpy arrays keyed
by a content hash, written once before any worker starts -> this module, which
memory-maps the arrays on every worker and cuts them into batches.

The sampler draws the global batch of step ``s`` from a per-epoch seeded
permutation of the examples, so the sequence of global batches does not depend
on the number of workers (ranks take strided slices of it), and resuming at
step ``s`` needs nothing but ``s``. An example is one row, one packed row, or a
(chosen, rejected) pair.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tunefleet.launcher.model.inputs import IGNORE_INDEX, ROW_FIELDS

_ARRAYS = ("input_ids", "labels", "offsets", "position_ids", "class_labels", "fields", "field_offsets")


@dataclass(frozen=True)
class TokenizedSplit:
    """Flat token arrays with row offsets: row ``i`` is ``input_ids[offsets[i]:offsets[i + 1]]``.

    ``labels`` holds the per-token targets (-100: no loss), ``position_ids`` the
    positions of packed rows (restarting at 0 for every packed example), and
    ``class_labels`` one class id per row for classification (no token labels).
    With ``rows_per_example == 2`` rows ``2e`` and ``2e + 1`` are the chosen and
    the rejected sequence of preference pair ``e``. Prompt rows (online RL) keep
    the row's other fields for the reward functions: row ``i``'s are the UTF-8
    JSON object ``fields[field_offsets[i]:field_offsets[i + 1]]``.
    """

    input_ids: np.ndarray
    labels: np.ndarray | None
    offsets: np.ndarray
    position_ids: np.ndarray | None = None
    class_labels: np.ndarray | None = None
    rows_per_example: int = 1
    fields: np.ndarray | None = None
    field_offsets: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_examples(self) -> int:
        return len(self) // self.rows_per_example

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def row(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        start, end = self.offsets[index], self.offsets[index + 1]
        return self.input_ids[start:end], None if self.labels is None else self.labels[start:end]

    def row_fields(self, index: int) -> dict:
        """Row ``index``'s other fields ({} for splits that keep none)."""
        if self.fields is None:
            return {}
        start, end = self.field_offsets[index], self.field_offsets[index + 1]
        return json.loads(np.asarray(self.fields[start:end]).tobytes())

    def example_rows(self, examples) -> list[int]:
        """Row indices of these examples: all first rows (chosen), then all second rows (rejected)."""
        k = self.rows_per_example
        return [int(e) * k + j for j in range(k) for e in examples]

    def take(self, examples) -> TokenizedSplit:
        """A new split holding these examples (rows copied, pairs kept together)."""
        k = self.rows_per_example
        rows = (np.asarray(examples, dtype=np.int64)[:, None] * k + np.arange(k)).reshape(-1)
        token_index, offsets = gather_rows(self.offsets, rows)

        def gather(array):
            return None if array is None else np.asarray(array)[token_index]

        fields, field_offsets = None, None
        if self.fields is not None:
            byte_index, field_offsets = gather_rows(self.field_offsets, rows)
            fields = np.asarray(self.fields)[byte_index]
        return TokenizedSplit(
            np.asarray(self.input_ids)[token_index], gather(self.labels), offsets, gather(self.position_ids),
            None if self.class_labels is None else np.asarray(self.class_labels)[rows], self.rows_per_example,
            fields, field_offsets,
        )

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True)
        for name in _ARRAYS:
            if getattr(self, name) is not None:
                np.save(folder / f"{name}.npy", getattr(self, name))
        (folder / "split.json").write_text(json.dumps({"rows_per_example": self.rows_per_example}))

    @classmethod
    def load(cls, folder: Path) -> TokenizedSplit:
        """Memory-maps every array: opening a split costs no copy, whatever its size."""
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") if (folder / f"{name}.npy").is_file()
                  else None for name in _ARRAYS}
        return cls(**arrays, **json.loads((folder / "split.json").read_text()))


def gather_rows(offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(token indices, new offsets) that lay ``rows`` out one after another."""
    offsets = np.asarray(offsets)
    lengths = offsets[rows + 1] - offsets[rows]
    new_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    shift = np.repeat(offsets[rows] - new_offsets[:-1], lengths)
    return np.arange(new_offsets[-1], dtype=np.int64) + shift, new_offsets


def concat(splits: list[TokenizedSplit]) -> TokenizedSplit:
    """One split holding every row of ``splits`` in order (all of one kind)."""
    first = splits[0]

    def joined(name):
        return None if getattr(first, name) is None else np.concatenate([getattr(s, name) for s in splits])

    def joined_offsets(name):
        """Each split's offsets moved past the items of the splits before it."""
        if getattr(first, name) is None:
            return None
        starts = np.cumsum([0] + [int(getattr(split, name)[-1]) for split in splits[:-1]])
        return np.concatenate([np.zeros(1, np.int64)] + [np.asarray(getattr(split, name)[1:]) + start
                                                         for split, start in zip(splits, starts, strict=True)])

    return TokenizedSplit(joined("input_ids"), joined("labels"), joined_offsets("offsets"), joined("position_ids"),
                          joined("class_labels"), first.rows_per_example, joined("fields"),
                          joined_offsets("field_offsets"))


def cache_meta(folder: Path) -> dict:
    """What preprocessing counted: rows, tokens, truncated/dropped/skipped, packing efficiency, sources."""
    return json.loads((Path(folder) / "meta.json").read_text())


def open_split(folder: Path, name: str) -> TokenizedSplit | None:
    path = Path(folder) / name
    return TokenizedSplit.load(path) if path.is_dir() else None


# --------------------------------------------------------------------------- sampling
def global_batch_indices(num_examples: int, step: int, global_batch: int, seed: int) -> np.ndarray:
    """Example indices of the global batch at ``step``: a seeded permutation per epoch."""
    start = step * global_batch
    out = []
    while len(out) < global_batch:
        epoch, offset = divmod(start + len(out), num_examples)
        order = np.random.default_rng([seed, epoch]).permutation(num_examples)
        out.extend(order[offset : offset + global_batch - len(out)].tolist())
    return np.asarray(out, dtype=np.int64)


def rank_micro_batches(
    split: TokenizedSplit, step: int, *, rank: int, world_size: int, micro_batch_size: int,
    grad_accum_steps: int, seed: int, pad_id: int,
) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches of the global batch at ``step`` (rank-strided)."""
    per_rank = micro_batch_size * grad_accum_steps
    indices = global_batch_indices(split.num_examples, step, per_rank * world_size, seed)
    mine = indices[rank::world_size]
    return [collate(split, mine[m : m + micro_batch_size], pad_id) for m in range(0, per_rank, micro_batch_size)]


def eval_batches(split: TokenizedSplit, *, rank: int, world_size: int, batch_size: int,
                 max_rows: int | None, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Every rank gets the same number of batches (sharded models run collectives)."""
    num_examples = min(split.num_examples, max_rows or split.num_examples)
    mine = list(range(rank, num_examples, world_size))
    per_rank = -(-num_examples // world_size)
    return [collate(split, mine[b * batch_size:(b + 1) * batch_size], pad_id)
            for b in range(-(-per_rank // batch_size))]


# --------------------------------------------------------------------------- batches
def collate(split: TokenizedSplit, examples, pad_id: int) -> dict[str, torch.Tensor | list[dict]]:
    """Right-padded tensors of these examples (pairs: chosen rows, then rejected rows).

    No examples gives one all-ignored pad row per example row (keeps ranks in
    step). Packed splits add ``position_ids``; the pad tail restarts at 0, so it
    is a document of its own. Classification gives one label per row; prompt
    rows add their other fields (``ROW_FIELDS``, a list of dicts, not a tensor).
    """
    rows = [split.row(r) for r in split.example_rows(examples)]
    rows = rows or [(np.asarray([pad_id]), None)] * split.rows_per_example
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, labs) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        if labs is not None:
            labels[i, : len(labs)] = torch.from_numpy(np.asarray(labs, dtype=np.int64))
        attention_mask[i, : len(ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if split.class_labels is not None:
        row_ids = split.example_rows(examples)
        batch["labels"] = torch.as_tensor(np.asarray(split.class_labels)[row_ids] if row_ids else [IGNORE_INDEX],
                                          dtype=torch.long)
    if split.position_ids is not None:
        batch["position_ids"] = _packed_positions(split, examples, width)
    if split.fields is not None:
        batch[ROW_FIELDS] = [split.row_fields(r) for r in split.example_rows(examples)] or [{}] * len(rows)
    return batch


def _packed_positions(split: TokenizedSplit, examples, width: int) -> torch.Tensor:
    positions = torch.arange(width).repeat(max(len(examples), 1), 1)
    for i, r in enumerate(split.example_rows(examples)):
        start, end = split.offsets[r], split.offsets[r + 1]
        positions[i, : end - start] = torch.from_numpy(np.asarray(split.position_ids[start:end], dtype=np.int64))
        positions[i, end - start:] = torch.arange(width - (end - start))
    return positions
