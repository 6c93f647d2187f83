"""Where training metrics go: ``metrics.jsonl``, the driver's console, W&B.

Only rank 0 reports. Rows are JSON objects with a ``step``; after a restart the
rows past the resumed step are dropped from ``metrics.jsonl`` before new ones
are appended, so the file never shows a step twice.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import time
from pathlib import Path
from typing import Any

from tunefleet.launcher.config import WandbConfig
from tunefleet.launcher.training.outcome import Outcome

METRICS_FILE = "metrics.jsonl"
WANDB_STEP_FILE = ".wandb_last_step"


def wandb_mode(cfg: WandbConfig) -> str:
    """The configured mode, else online with an API key (env or netrc) and offline without."""
    if cfg.mode is not None:
        return cfg.mode
    return "online" if _has_wandb_key() else "offline"


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def truncate_after(path: Path, step: int) -> None:
    """Keep only rows with ``step <= step`` (the ones a resume does not redo)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items() if v is not None}


PER_RANK = "_per_rank"


class Reporter:
    """Rank 0's sink for metrics (``metrics.jsonl`` and the driver's hub, see control.py); no-ops elsewhere."""

    def __init__(self, *, enabled: bool, output_dir: str, hub=None):
        self.enabled = enabled
        self.path = Path(output_dir) / METRICS_FILE
        self.hub = hub
        self.sent = None  # the last event's call on the hub

    def start(self, *, start_step: int, resumed_from: Path | None, attachments: dict | None = None) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A resume keeps the rows up to its checkpoint's step; a start without one (a first launch, or a restart
        # before the first checkpoint) redoes everything, the evaluation at step 0 included.
        truncate_after(self.path, start_step if resumed_from else -1)
        self._send({"event": "start", "start_step": start_step, "attachments": attachments or {},
                    "resumed_from": str(resumed_from) if resumed_from else None})

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = _clean({**row, "time": round(time.time(), 3)})
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        self._send({"event": "metrics", **row})

    def finish(self, outcome: Outcome) -> None:
        """How the run ended, for the driver (the event pickles the frozen outcome through the hub); returns
        once the hub has it, and with it every earlier event."""
        if self.enabled:
            self._send({"event": "finish", "outcome": outcome})
            self.flush()

    def _send(self, message: dict[str, Any]) -> None:
        """Without waiting: the hub runs one caller's calls in order."""
        if self.hub is not None:
            self.sent = self.hub.put.remote(message)

    def flush(self) -> None:
        if self.sent is not None:
            import ray

            ray.get(self.sent)


class WandbRun:
    """The job's one W&B run, owned by the driver, which outlives worker failures.

    After a restart the workers recompute steps bitwise identically, so rows for
    steps W&B already has are not sent again: W&B never sees a step go backwards.
    A row is committed by W&B once a later step arrives (or at finish); the last
    committed step is kept in the run folder so a relaunch continues the same way.
    """

    def __init__(self, cfg: WandbConfig, *, output_dir: str, run_id: str, name: str, config: dict):
        self.cfg, self.output_dir, self.run_id, self.name, self.config = cfg, Path(output_dir), run_id, name, config
        self.mode = wandb_mode(cfg)
        step_file = self.output_dir / WANDB_STEP_FILE
        self._committed = int(step_file.read_text()) if step_file.is_file() else -1
        self._step = -1
        self._run = None

    def handle(self, events: list[dict[str, Any]]) -> None:
        if self.mode == "disabled":
            return
        for event in events:
            if event.get("event") == "start":
                self._ensure().config.update(event.get("attachments") or {}, allow_val_change=True)
            elif event.get("event") == "metrics":
                self._log({k: v for k, v in event.items() if k != "event"})

    def _ensure(self):
        if self._run is None:
            import wandb

            cfg = self.cfg
            self._run = wandb.init(
                project=cfg.project, entity=cfg.entity, name=cfg.name or self.name, group=cfg.group,
                tags=cfg.tags or None, id=self.run_id, resume="allow", mode=self.mode,
                dir=str(self.output_dir), config=self.config, settings=wandb.Settings(console="off"),
            )
        return self._run

    def _log(self, row: dict[str, Any]) -> None:
        step = row["step"]
        if step <= self._committed or step < self._step:
            return
        if step > self._step >= 0:
            self._note_committed(self._step)
        self._step = step
        self._ensure().log(wandb_row(row), step=step)

    def finish(self, summary: dict[str, Any]) -> None:
        if self._run is not None:
            self._run.summary.update(_clean(summary))
            self._run.finish()
            self._note_committed(self._step)

    def _note_committed(self, step: int) -> None:
        self._committed = max(self._committed, step)
        (self.output_dir / WANDB_STEP_FILE).write_text(str(self._committed))


def wandb_row(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics row as W&B keys: per-rank lists (``rss_bytes_per_rank``) become one series per rank,
    grouped in the run as ``rank_<i>/<name>`` (W&B draws a panel section per prefix)."""
    flat = {}
    for key, value in row.items():
        if key in ("step", "time"):
            continue
        if key.endswith(PER_RANK) and isinstance(value, list):
            flat.update({f"rank_{i}/{key[: -len(PER_RANK)]}": v for i, v in enumerate(value)})
        else:
            flat[key] = value
    return flat
