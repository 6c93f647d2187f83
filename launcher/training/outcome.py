"""How a worker group's training ended, as rank 0 tells the driver (the "finish" event): a frozen result with a
state the driver decides from (the run's recorded state, the exit code), and the facts the launch summary shows.
Every rank computes the same outcome."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class RunState(Enum):
    FINISHED = "finished"  # trained to train.max_steps
    STOPPED_EARLY = "stopped early"  # data.eval.early_stopping_patience ran out; a relaunch trains no further
    PREEMPTED = "preempted"  # a stop request (SIGTERM, SIGUSR1, Ctrl-C): checkpointed, the next launch resumes
    PREFLIGHT_FAILED = "preflight failed"  # a worker's environment check failed before the model was loaded


@dataclass(frozen=True)
class Outcome:
    state: RunState
    preflight: dict  # the preflight report (nodes, versions, all-reduce bandwidth), written to preflight.json
    problems: tuple[str, ...] = ()  # PREFLIGHT_FAILED: every failed check, naming its node and rank
    preempted_at: int | None = None  # PREEMPTED: the step of the checkpoint it left
    stop_reason: str | None = None  # PREEMPTED: the signal that asked for the stop
    stopped_early_at: int | None = None  # STOPPED_EARLY: the last step trained
    final_dir: str | None = None  # the exported model (checkpoint.export_final), else None
    final_step: int | None = None  # the step whose weights final_dir holds (the best one with final_from: best)
    best: dict | None = None  # the best evaluation (BestMetric.state()) when the run followed a metric
