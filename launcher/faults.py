"""Fault injection for tests, keyed by (rank, step): raise, SIGKILL or stall.

Set ``TUNEFLEET_FAULT="rank=1,step=5,kind=sigkill"`` when launching; each fault
fires once per output folder (a marker file remembers it), so the restarted
worker group runs past it.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

KINDS = ("raise", "sigkill", "stall")


class InjectedFault(RuntimeError):
    pass


def parse(spec: str) -> dict:
    """`rank=1,step=5,kind=sigkill[,seconds=30]` -> dict; empty spec -> {}."""
    if not spec:
        return {}
    fault = dict(part.split("=", 1) for part in spec.split(","))
    if fault.get("kind") not in KINDS:
        raise ValueError(f"TUNEFLEET_FAULT kind must be one of {KINDS}: {spec!r}")
    return {"rank": int(fault["rank"]), "step": int(fault["step"]), "kind": fault["kind"],
            "seconds": float(fault.get("seconds", 3600))}


def maybe_inject(fault: dict, *, rank: int, step: int, output_dir: str) -> None:
    if fault["rank"] != rank or fault["step"] != step:
        return
    marker = Path(output_dir) / f".fault-rank{rank}-step{step}"
    if marker.exists():
        return
    marker.write_text(fault["kind"])
    if fault["kind"] == "raise":
        raise InjectedFault(f"injected fault at rank {rank}, step {step}")
    if fault["kind"] == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(fault["seconds"])
