"""The best evaluation so far, for `checkpoint.keep_best` and early stopping.

Pure bookkeeping, no process group: the loop feeds it every evaluation (the
same value on every rank) and saves its state in each checkpoint's meta.json
under ``best``, so a resumed run keeps its best step and its patience count.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

from tunefleet.launcher.config.data import EvalSplit

META_KEY = "best"  # where checkpoint meta.json keeps the state (checkpoint.py protects `step` from pruning)


@dataclass
class BestMetric:
    metric: str
    direction: Literal["min", "max"]
    patience: int | None = None  # evaluations without a new best before stopping; None never stops
    value: float | None = None
    step: int | None = None
    evals_without_improvement: int = 0

    @classmethod
    def for_run(cls, evaluation: EvalSplit | None, *, keep_best: bool) -> BestMetric | None:
        """A tracker of ``data.eval.metric`` when the run keeps the best checkpoint (``keep_best``) or stops
        early, else None."""
        patience = evaluation.early_stopping_patience if evaluation is not None else None
        if not keep_best and patience is None:
            return None
        return cls(metric=evaluation.metric, direction=evaluation.direction, patience=patience)

    def update(self, step: int, value: float) -> bool:
        """Record an evaluation at ``step``; True if it is a new best. The evaluation before training
        (step 0) is a baseline and never the best: there is no checkpoint of it."""
        if step == 0:
            return False
        better = math.isfinite(value) and (
            self.value is None or (value < self.value if self.direction == "min" else value > self.value)
        )
        if better:
            self.value, self.step, self.evals_without_improvement = value, step, 0
        else:
            self.evals_without_improvement += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.evals_without_improvement >= self.patience

    def state(self) -> dict:
        """What a checkpoint records (JSON)."""
        return {key: value for key, value in asdict(self).items() if key != "patience"}

    def restore(self, saved: dict | None) -> None:
        """Continue from a checkpoint's state; one that followed another metric or direction is ignored."""
        if saved and (saved.get("metric"), saved.get("direction")) == (self.metric, self.direction):
            self.value, self.step = saved["value"], saved["step"]
            self.evals_without_improvement = saved["evals_without_improvement"]
