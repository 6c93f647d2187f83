"""Splits, the sampler and batches: what every worker does with the cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tunefleet.launcher.data import batches
from tunefleet.launcher.data.batches import TokenizedSplit
from tunefleet.launcher.errors import UserError
from tunefleet.launcher.model.inputs import IGNORE_INDEX, model_inputs
from tunefleet.launcher.plan.layout import rebalance
from tunefleet.strategies.base import StrategyPlan


def make_split(lengths, *, rows_per_example=1, classes=None) -> TokenizedSplit:
    """Row i holds tokens 100*i + (0, 1, ...), every token a target."""
    ids = np.concatenate([100 * i + np.arange(n) for i, n in enumerate(lengths)]).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    class_labels = None if classes is None else np.asarray(classes, np.int64)
    return TokenizedSplit(ids, None if classes is not None else ids.copy(), offsets,
                          class_labels=class_labels, rows_per_example=rows_per_example)


def rows_of(batch) -> list[int]:
    return [int(row[0]) // 100 for row in batch["input_ids"]]


# --------------------------------------------------------------------------- sampler
def global_sequence(world_size: int, micro: int, accum: int, steps=range(0, 14)) -> list[list[int]]:
    """Per step, the global batch's examples as the ranks together see them (rank-major order restored)."""
    split = make_split([3] * 100)
    out = []
    for step in steps:
        per_rank = [sum((rows_of(mb) for mb in batches.rank_micro_batches(
            split, step, rank=rank, world_size=world_size, micro_batch_size=micro, grad_accum_steps=accum,
            seed=3, pad_id=0)), []) for rank in range(world_size)]
        out.append([per_rank[i % world_size][i // world_size] for i in range(world_size * micro * accum)])
    return out


def test_the_sequence_of_global_batches_is_the_same_on_1_2_and_3_workers():
    """Global batch 6 (micro x accum x workers); step 13 crosses an epoch boundary (6 x 17 > 100)."""
    reference = global_sequence(1, 3, 2, steps=range(0, 20))
    assert global_sequence(2, 3, 1, steps=range(0, 20)) == reference
    assert global_sequence(3, 1, 2, steps=range(0, 20)) == reference
    assert global_sequence(3, 2, 1, steps=range(0, 20)) == reference


def test_a_global_batch_that_does_not_split_over_the_workers_is_refused_naming_the_keys():
    plan = StrategyPlan(name="ddp", world_size=2, num_nodes=1, workers_per_node=2, micro_batch_size=2,
                        grad_accum_steps=2)  # global batch 8 rows
    assert rebalance(plan, world_size=1).grad_accum_steps == 4
    with pytest.raises(UserError, match="parallelism.workers_per_node or train.micro_batch_size"):
        rebalance(plan, world_size=3)


def test_each_epoch_visits_every_example_once_and_the_seed_matters():
    picked = [batches.global_batch_indices(48, step, 16, seed=0) for step in range(3)]
    assert sorted(np.concatenate(picked).tolist()) == list(range(48))
    assert not np.array_equal(batches.global_batch_indices(100, 0, 16, 1), batches.global_batch_indices(100, 0, 16, 2))


def test_resuming_at_a_step_gives_the_same_batches():
    split = make_split([2] * 30)
    kwargs = dict(rank=1, world_size=2, micro_batch_size=2, grad_accum_steps=2, seed=5, pad_id=0)
    first = [rows_of(mb) for step in range(9) for mb in batches.rank_micro_batches(split, step, **kwargs)]
    resumed = [rows_of(mb) for step in range(6, 9) for mb in batches.rank_micro_batches(split, step, **kwargs)]
    assert resumed == first[-6:]


def test_eval_batches_equal_count_on_every_rank():
    split = make_split([2] * 7)
    counts = [len(batches.eval_batches(split, rank=r, world_size=3, batch_size=2, max_rows=None, pad_id=0))
              for r in range(3)]
    assert counts == [2, 2, 2]
    last = batches.eval_batches(split, rank=2, world_size=3, batch_size=2, max_rows=None, pad_id=0)[-1]
    assert (last["labels"] == IGNORE_INDEX).all()  # an empty batch is one ignored pad row


# --------------------------------------------------------------------------- batches
def test_collate_right_pads_and_ignores_the_padding():
    batch = batches.collate(make_split([2, 4]), [0, 1], pad_id=7)
    assert batch["input_ids"].tolist() == [[0, 1, 7, 7], [100, 101, 102, 103]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["labels"][0].tolist() == [0, 1, IGNORE_INDEX, IGNORE_INDEX]
    assert "position_ids" not in batch and set(model_inputs(batch)) == {"input_ids", "attention_mask"}


def test_pairs_collate_chosen_rows_then_rejected_rows():
    split = make_split([2, 3, 2, 2, 4, 2], rows_per_example=2)  # pairs (0, 1), (2, 3), (4, 5)
    assert split.num_examples == 3
    assert rows_of(batches.collate(split, [2, 0], pad_id=0)) == [4, 0, 5, 1]
    assert batches.collate(split, [], pad_id=0)["input_ids"].shape == (2, 1)  # an empty pair keeps ranks in step
    assert split.take([2]).row(1)[0].tolist() == [500, 501]


def test_classification_batches_carry_one_label_per_row():
    split = make_split([2, 3, 1], classes=[4, 0, 2])
    batch = batches.collate(split, [2, 0], pad_id=0)
    assert batch["labels"].tolist() == [2, 4] and batch["input_ids"].shape == (2, 2)
    assert batches.collate(split, [], pad_id=0)["labels"].tolist() == [IGNORE_INDEX]


def test_packed_batches_restart_positions_and_leave_the_mask_to_the_model():
    split = TokenizedSplit(np.arange(7, dtype=np.int32), np.arange(7, dtype=np.int32), np.asarray([0, 5, 7]),
                           position_ids=np.asarray([0, 1, 2, 0, 1, 0, 1], np.int32))
    batch = batches.collate(split, [0, 1], pad_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert batch["attention_mask"].sum() == 7  # still counts real tokens
    assert set(model_inputs(batch)) == {"input_ids", "position_ids"}


def test_splits_round_trip_through_memory_mapped_files(tmp_path):
    split = make_split([2, 3, 2, 2], rows_per_example=2)
    split.save(tmp_path / "train")
    loaded = batches.open_split(tmp_path, "train")
    assert isinstance(loaded.input_ids, np.memmap) and loaded.rows_per_example == 2
    assert [loaded.row(i)[0].tolist() for i in range(4)] == [split.row(i)[0].tolist() for i in range(4)]
    assert batches.open_split(tmp_path, "eval") is None
    joined = batches.concat([split, loaded.take([1])])
    assert joined.num_examples == 3 and joined.row(5)[0].tolist() == [300, 301]
    assert isinstance(batches.collate(joined, [2], pad_id=0)["input_ids"], torch.Tensor)


def test_concat_passes_over_empty_splits():
    empty = make_split([2]).take([])
    joined = batches.concat([empty, make_split([2, 3]), empty, make_split([1]).take([0]), empty])
    assert joined.offsets.tolist() == [0, 2, 5, 6]
    assert [joined.row(i)[0].tolist() for i in range(3)] == [[0, 1], [100, 101, 102], [0]]
    assert batches.concat([empty, empty]).num_examples == 0
