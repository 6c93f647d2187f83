"""The run's one driver-side actor (``HubActor``, on the head node): workers' events travel to the driver through it,
and the driver's stop request (preemption) through it to the workers, which honour it at the same step.

Events: rank 0's metrics rows, start and outcome, and the controller's worker-failure reports queue on the hub
until the driver, polling every half second, takes them all in one call. Rank 0 does not wait for each row to
arrive (calls from one caller run in order on the actor; the outcome, sent last, is waited for).

Stop requests: the driver turns SIGTERM / SIGUSR1 (what Slurm and Kubernetes send before they kill a job) and a
user's first Ctrl-C into a request on the hub. Rank 0 polls it without blocking, and all ranks agree through one
all-reduce per step, so they checkpoint the same step and stop together.

One actor rather than a Ray queue plus a control actor: each Ray actor is a process of its own (Python and Ray
imported while the ranks start, then Ray's timers while they train).
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


class Hub:
    """What the hub holds: events for the driver, and the first stop request's reason."""

    def __init__(self):
        self.events: list = []
        self.reason: str | None = None

    def put(self, event) -> None:
        self.events.append(event)

    def take_all(self) -> list:
        events, self.events = self.events, []
        return events

    def request_stop(self, reason: str) -> None:
        self.reason = self.reason or reason

    def stop_reason(self) -> str | None:
        return self.reason


HubActor = ray.remote(num_cpus=0)(Hub)  # shows as ray::Hub


class StopPoller:
    """Rank 0 asks the hub in the background; ``agreed()`` is collective."""

    def __init__(self, hub, rank: int):
        self.hub = hub if rank == 0 else None
        self.pending = None
        self.reason: str | None = None

    def _poll(self) -> None:
        if self.hub is None or self.reason is not None:
            return
        if self.pending is None:
            self.pending = self.hub.stop_reason.remote()
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


def forward_signals_to(hub, on_signal=None) -> None:
    """Driver: SIGTERM, SIGUSR1 and a first Ctrl-C (SIGINT) request a checkpoint-and-stop instead of
    dying; a second Ctrl-C leaves at once (exit 130), the latest complete checkpoint still resumable."""
    interrupted = []

    def handler(signum, _frame):
        if signum == signal.SIGINT:
            if interrupted:
                os._exit(EXIT_INTERRUPTED)
            interrupted.append(signum)
        hub.request_stop.remote(signal.Signals(signum).name)
        if on_signal is not None:
            on_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(signum, handler)
