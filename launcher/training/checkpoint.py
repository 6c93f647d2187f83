"""Resumable checkpoints: written atomically, found by "latest", pruned.

Layout: ``<dir>/step_<N>/`` holds ``state/`` (the strategy's model, optimizer
and scheduler), ``rng/rank_<R>.pt`` and ``meta.json`` (step, tokens seen,
world size, W&B run id, recipe fingerprint, the best evaluation so far), then
``COMPLETE`` last. Ranks write into ``<dir>/.partial-step_<N>/`` which rank 0
renames once everything is on disk, so a crash mid-save leaves only a partial
folder that "latest" never picks and the next save clears. Pruning keeps the
last ``keep_last`` and, with ``keep_best``, the best checkpoint the newest one
names.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from tunefleet.launcher import collectives
from tunefleet.strategies.base import Strategy

COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _barrier() -> None:
    collectives.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def complete_steps(root: str | Path) -> list[int]:
    """Steps with a complete checkpoint under ``root``, ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / COMPLETE).is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def latest(root: str | Path) -> Path | None:
    steps = complete_steps(root)
    return Path(root) / f"step_{steps[-1]}" if steps else None


def read_meta(path: str | Path) -> dict:
    return json.loads((Path(path) / "meta.json").read_text())


def best_step(path: str | Path) -> int | None:
    """The step of the best checkpoint as recorded in the checkpoint at ``path``, if any."""
    return (read_meta(path).get("best") or {}).get("step")


class CheckpointManager:
    """Saves are collective. With ``async_save`` and a strategy that can (``AsyncSave``),
    the state is written in the background and the step loop stalls only for staging;
    the checkpoint becomes complete (marker + rename) once every rank's write is done."""

    def __init__(self, root: str, keep_last: int, async_save: bool = False, keep_best: bool = False):
        self.root = Path(root)
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.async_save = async_save
        self._pending: threading.Thread | None = None
        self._pending_error: list[BaseException] = []
        self._group = None

    def save(self, step: int, strategy: Strategy, meta: dict, before_commit=None) -> Path:
        """Collective: every rank calls it; returns the final folder.

        ``before_commit`` runs on every rank once its state is written but before
        the checkpoint is marked complete (fault-injection tests use it).
        """
        self.wait()  # one checkpoint in flight at a time
        final = self.root / f"step_{step}"
        partial = self.root / f".partial-step_{step}"
        if _rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
            (partial / "rng").mkdir(parents=True)
        _barrier()
        torch.save(rng_state(), partial / "rng" / f"rank_{_rank()}.pt")
        meta = {**meta, "step": step}
        # DCP's import (~0.5 s) is a worker's: the driver reads checkpoint folders only
        from tunefleet.strategies.dcp_state import AsyncSave

        if self.async_save and isinstance(strategy, AsyncSave):
            future = strategy.save_async(str(partial / "state"), self._checkpoint_group())
            self._pending = threading.Thread(
                target=self._finish_async, args=(future, partial, final, meta, before_commit), daemon=True
            )
            self._pending.start()
            return final
        strategy.save(str(partial / "state"))
        if before_commit is not None:
            before_commit()
        _barrier()
        if _rank() == 0:
            self._commit(partial, final, meta)
        _barrier()
        return final

    def _checkpoint_group(self):
        if self._group is None and dist.is_initialized():
            self._group = dist.new_group(backend="gloo")
        return self._group

    def _finish_async(self, future, partial: Path, final: Path, meta: dict, before_commit) -> None:
        try:
            future.result()
            if before_commit is not None:
                before_commit()
            collectives.barrier(group=self._group)
            if _rank() == 0:
                self._commit(partial, final, meta)
        except BaseException as exc:  # surfaced on the training thread by wait()
            self._pending_error.append(exc)

    def _commit(self, partial: Path, final: Path, meta: dict) -> None:
        (partial / "meta.json").write_text(json.dumps(meta, indent=2))
        (partial / COMPLETE).write_text("")
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        self.prune()

    def wait(self) -> None:
        """Block until a background save is complete on disk; re-raise its error."""
        if self._pending is not None:
            self._pending.join()
            self._pending = None
        if self._pending_error:
            raise self._pending_error.pop()

    def load(self, path: Path, strategy: Strategy) -> dict:
        """Collective: restore strategy state, and this rank's RNG if the world size matches."""
        meta = read_meta(path)
        strategy.load(str(path / "state"))
        rng_file = path / "rng" / f"rank_{_rank()}.pt"
        world = dist.get_world_size() if dist.is_initialized() else 1
        if meta.get("world_size") == world and rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        return meta

    def prune(self) -> None:
        """Keep the last ``keep_last`` complete checkpoints, and with ``keep_best`` the best one
        that the newest checkpoint's meta names (``best.step``, see best_metric.py)."""
        steps = complete_steps(self.root)
        protected = best_step(self.root / f"step_{steps[-1]}") if self.keep_best and steps else None
        for step in steps[: -self.keep_last]:
            if step != protected:
                shutil.rmtree(self.root / f"step_{step}", ignore_errors=True)
        for stale in self.root.glob(".partial-step_*"):
            match = re.search(r"(\d+)$", stale.name)
            if match and (self.root / f"step_{match.group(1)}").exists():
                shutil.rmtree(stale, ignore_errors=True)
