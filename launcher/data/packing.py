"""Packing: whole tokenized rows into rows of at most ``max_seq_len`` tokens.

Rows are placed best fit decreasing (longest first, each into the fullest
packed row it still fits), which is deterministic and needs no seed; a row is
never split, so every document keeps its exact loss. Each packed document gets
position ids restarting at 0 and its first label ignored (it would otherwise be
predicted from the previous document's last token); ``data.model_inputs`` then
lets transformers build the per-document causal mask from the position ids.

Packing happens once, at preprocessing time, so the sampler sees fixed rows and
stays deterministic and independent of the world size.
"""

from __future__ import annotations

import bisect

import numpy as np

from tunefleet.launcher.data.batches import TokenizedSplit, gather_rows
from tunefleet.launcher.model.inputs import IGNORE_INDEX


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins of row indices whose lengths sum to at most ``capacity``."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted; full bins leave the list
    for row in np.argsort(-lengths, kind="stable"):
        size = int(lengths[row])
        slot = bisect.bisect_left(free, (size, -1))
        if slot == len(free):
            bins.append([int(row)])
            room, index = capacity - size, len(bins) - 1
        else:
            room, index = free.pop(slot)
            bins[index].append(int(row))
            room -= size
        if room > 0:
            bisect.insort(free, (room, index))
    return bins


def pack(split: TokenizedSplit, max_seq_len: int) -> TokenizedSplit:
    """A split whose rows are packs of ``split``'s rows, with restarting ``position_ids``."""
    assert split.rows_per_example == 1 and split.class_labels is None, "only sft rows are packed"
    lengths = np.diff(np.asarray(split.offsets))
    groups = best_fit_decreasing(lengths, max_seq_len)
    token_index, doc_offsets = gather_rows(split.offsets, np.asarray([r for g in groups for r in g], np.int64))
    positions = (np.arange(len(token_index)) - np.repeat(doc_offsets[:-1], np.diff(doc_offsets))).astype(np.int32)
    labels = np.asarray(split.labels)[token_index]
    labels[positions == 0] = IGNORE_INDEX
    packed_lengths = [int(lengths[group].sum()) for group in groups]
    packed_offsets = np.zeros(len(packed_lengths) + 1, dtype=np.int64)
    np.cumsum(packed_lengths, out=packed_offsets[1:])
    return TokenizedSplit(np.asarray(split.input_ids)[token_index], labels, packed_offsets, positions)


def packing_efficiency(split: TokenizedSplit, max_seq_len: int) -> float:
    """Share of the ``rows x max_seq_len`` token slots that hold real tokens (1.0: no padding)."""
    return split.num_tokens / max(len(split) * max_seq_len, 1)
