"""Fault injection for tests, keyed by (rank, step): raise, SIGKILL, SIGSEGV, SIGTERM or stall.

Set ``TUNEFLEET_FAULT="rank=1,step=5,kind=sigkill"`` when launching (``at=step``,
the default, fires before that step's forward; ``at=checkpoint`` fires while the
checkpoint of that step is half written); ``;`` separates several faults. The
driver forwards ``TUNEFLEET_*`` variables to the workers, where the training loop
reads the spec (``planned``).
Each fault fires once per output folder (a marker file remembers it), so the
restarted worker group runs past it.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

ENV = "TUNEFLEET_FAULT"
KINDS = ("raise", "sigkill", "segv", "sigterm", "stall")
_SIGNALS = {"sigkill": signal.SIGKILL, "segv": signal.SIGSEGV, "sigterm": signal.SIGTERM}
PLACES = ("step", "checkpoint")


class InjectedFault(RuntimeError):
    pass


def parse(spec: str) -> list[dict]:
    """`rank=1,step=5,kind=sigkill[,at=checkpoint][,seconds=30]` (``;`` between several) -> one dict per
    fault; empty spec -> []."""
    return [_parse_one(part) for part in spec.split(";") if part.strip()]


def _parse_one(spec: str) -> dict:
    fault = dict(part.split("=", 1) for part in spec.strip().split(","))
    if fault.get("kind") not in KINDS:
        raise ValueError(f"TUNEFLEET_FAULT kind must be one of {KINDS}: {spec!r}")
    if fault.get("at", "step") not in PLACES:
        raise ValueError(f"TUNEFLEET_FAULT at must be one of {PLACES}: {spec!r}")
    return {"rank": int(fault["rank"]), "step": int(fault["step"]), "kind": fault["kind"],
            "at": fault.get("at", "step"), "seconds": float(fault.get("seconds", 3600))}


def planned() -> list[dict]:
    """The faults this process's environment plans (``TUNEFLEET_FAULT``); [] in normal runs."""
    return parse(os.environ.get(ENV, ""))


def maybe_inject(plan: list[dict], *, rank: int, step: int, at: str, output_dir: str) -> None:
    for fault in plan:
        if (fault["rank"], fault["step"], fault["at"]) == (rank, step, at):
            _inject(fault, rank=rank, step=step, at=at, output_dir=output_dir)


def _inject(fault: dict, *, rank: int, step: int, at: str, output_dir: str) -> None:
    marker = Path(output_dir) / f".fault-rank{rank}-step{step}-{at}"
    if marker.exists():
        return
    marker.write_text(fault["kind"])
    if fault["kind"] == "raise":
        raise InjectedFault(f"injected fault at rank {rank}, step {step}")
    if fault["kind"] in _SIGNALS:
        os.kill(os.getpid(), _SIGNALS[fault["kind"]])
        time.sleep(60)  # a handled SIGTERM ends the process from Ray's side; never train on meanwhile
    time.sleep(fault["seconds"])
