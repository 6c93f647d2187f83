"""Driver -> workers control: a stop request (preemption) that every rank
honours at the same step.

The driver turns SIGTERM / SIGUSR1 (what Slurm and Kubernetes send before
they kill a job) and a user's first Ctrl-C into a request on a tiny Ray actor. Rank 0 polls that actor
without blocking, and all ranks agree through one all-reduce per step, so
they checkpoint the same step and stop together.
"""

from __future__ import annotations

import os
import signal

import ray
import torch
import torch.distributed as dist

from tunefleet.launcher import collectives

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"; the next launch resumes
EXIT_INTERRUPTED = 130  # a second Ctrl-C: 128 + SIGINT, as shells report it


@ray.remote(num_cpus=0)
class Control:
    def __init__(self):
        self.reason: str | None = None

    def request_stop(self, reason: str) -> None:
        self.reason = self.reason or reason

    def stop_reason(self) -> str | None:
        return self.reason


class StopPoller:
    """Rank 0 asks the control actor in the background; ``agreed()`` is collective."""

    def __init__(self, control, rank: int):
        self.control = control if rank == 0 else None
        self.pending = None
        self.reason: str | None = None

    def _poll(self) -> None:
        if self.control is None or self.reason is not None:
            return
        if self.pending is None:
            self.pending = self.control.stop_reason.remote()
            return
        ready, _ = ray.wait([self.pending], timeout=0)
        if ready:
            self.reason = ray.get(self.pending)
            self.pending = None

    def agreed(self) -> bool:
        """True on every rank once rank 0 has seen a stop request."""
        self._poll()
        flag = torch.tensor([1 if self.reason else 0], dtype=torch.int32)
        return bool(collectives.all_reduce(flag, op=dist.ReduceOp.MAX).item())


def forward_signals_to(control, on_signal=None) -> None:
    """Driver: SIGTERM, SIGUSR1 and a first Ctrl-C (SIGINT) request a checkpoint-and-stop instead of
    dying; a second Ctrl-C leaves at once (exit 130), the latest complete checkpoint still resumable."""
    interrupted = []

    def handler(signum, _frame):
        if signum == signal.SIGINT:
            if interrupted:
                os._exit(EXIT_INTERRUPTED)
            interrupted.append(signum)
        control.request_stop.remote(signal.Signals(signum).name)
        if on_signal is not None:
            on_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(signum, handler)
