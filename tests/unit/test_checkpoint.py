"""Checkpoint folder contract: atomic, COMPLETE last, latest, prune, RNG restore."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from tunefleet.launcher.training import checkpoint
from tunefleet.launcher.training.checkpoint import CheckpointManager


class FileStrategy:
    """Stands in for a strategy: its 'state' is one tensor file."""

    def __init__(self, value: float = 0.0):
        self.value = torch.tensor([value])

    def save(self, path: str) -> None:
        Path(path).mkdir(parents=True)
        torch.save(self.value, Path(path) / "value.pt")

    def load(self, path: str) -> None:
        self.value = torch.load(Path(path) / "value.pt")


def test_save_writes_complete_folder_and_latest_finds_it(tmp_path):
    manager = CheckpointManager(str(tmp_path), keep_last=2)
    final = manager.save(5, FileStrategy(1.5), {"tokens_seen": 10, "world_size": 1})
    assert final == tmp_path / "step_5" and (final / "COMPLETE").is_file()
    assert checkpoint.read_meta(final) == {"tokens_seen": 10, "world_size": 1, "step": 5}
    assert checkpoint.latest(tmp_path) == final
    assert not list(tmp_path.glob(".partial-*"))


def test_half_written_checkpoint_is_never_latest(tmp_path):
    manager = CheckpointManager(str(tmp_path), keep_last=3)
    manager.save(4, FileStrategy(), {"world_size": 1})
    (tmp_path / ".partial-step_8" / "state").mkdir(parents=True)  # a save killed midway
    (tmp_path / "step_9").mkdir()  # renamed by hand but never completed
    assert checkpoint.latest(tmp_path) == tmp_path / "step_4"
    manager.save(8, FileStrategy(2.0), {"world_size": 1})
    assert checkpoint.latest(tmp_path) == tmp_path / "step_8"
    assert not (tmp_path / ".partial-step_8").exists()


def test_prune_keeps_the_newest(tmp_path):
    manager = CheckpointManager(str(tmp_path), keep_last=2)
    for step in (1, 2, 3, 4):
        manager.save(step, FileStrategy(step), {"world_size": 1})
    assert checkpoint.complete_steps(tmp_path) == [3, 4]


def test_load_restores_state_and_rng(tmp_path):
    manager = CheckpointManager(str(tmp_path), keep_last=1)
    random.seed(1)
    torch.manual_seed(1)
    manager.save(3, FileStrategy(7.0), {"world_size": 1, "tokens_seen": 0})
    expected = (random.random(), torch.rand(2))
    random.seed(99)
    torch.manual_seed(99)
    restored = FileStrategy()
    meta = manager.load(tmp_path / "step_3", restored)
    assert meta["step"] == 3 and restored.value.item() == 7.0
    assert random.random() == expected[0] and torch.equal(torch.rand(2), expected[1])


def test_rng_not_restored_at_another_world_size(tmp_path):
    manager = CheckpointManager(str(tmp_path), keep_last=1)
    torch.manual_seed(1)
    manager.save(3, FileStrategy(), {"world_size": 4})
    torch.manual_seed(5)
    expected = torch.rand(1)
    torch.manual_seed(5)
    manager.load(tmp_path / "step_3", FileStrategy())
    assert torch.equal(torch.rand(1), expected)
