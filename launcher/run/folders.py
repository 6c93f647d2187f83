"""Run folders: the driver records its state in ``run.json``; ``tunefleet runs``
lists the runs under a folder with their folder, start, state, last step,
checkpoint and restarts."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tunefleet.launcher.training import checkpoint
from tunefleet.launcher.training.metrics import METRICS_FILE

RUN_FILE = "run.json"
# "stopped early": finished before train.max_steps by data.eval.early_stopping_patience.
STATES = ("running", "finished", "stopped early", "failed", "preempted")


def record_state(output_dir: str | Path, state: str, **extra) -> None:
    """Merge ``state`` into run.json; "running" (each launch) also sets ``started``."""
    assert state in STATES
    path = Path(output_dir) / RUN_FILE
    previous = json.loads(path.read_text()) if path.is_file() else {}
    now = round(time.time(), 1)
    started = {"started": now} if state == "running" else {}
    record = {**previous, "state": state, "pid": os.getpid(), "updated": now, **started, **extra}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _last_metrics(run_dir: Path) -> dict:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    train = [r for r in rows if "loss" in r]
    return train[-1] if train else {}


def describe(run_dir: Path) -> dict:
    record = json.loads((run_dir / RUN_FILE).read_text())
    state = record["state"]
    if state == "running" and not _pid_alive(record["pid"]):
        state = "failed"  # the driver died without recording an outcome
    last = _last_metrics(run_dir)
    ckpt_root = record.get("checkpoint_dir") or run_dir / "checkpoints"
    latest = checkpoint.latest(ckpt_root)
    return {
        "run": str(run_dir), "name": record.get("name", run_dir.name), "started": record.get("started"),
        "state": state,
        "last_step": last.get("step", 0), "max_steps": record.get("max_steps"),
        "last_loss": last.get("loss"), "last_checkpoint": latest.name if latest else None,
        "restarts": last.get("restarts", 0),
    }


def find_runs(root: str | Path) -> list[dict]:
    """Every run folder at or below ``root`` (a folder holding run.json)."""
    root = Path(root)
    candidates = [root] if (root / RUN_FILE).is_file() else sorted(p.parent for p in root.rglob(RUN_FILE))
    return [describe(path) for path in candidates]
