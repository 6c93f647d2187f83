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

from tunefleet.launcher.recipe import WandbConfig

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


class Reporter:
    """Rank 0's sink for metrics; every method is a no-op on other ranks."""

    def __init__(self, *, enabled: bool, output_dir: str, queue=None, wandb: WandbConfig | None = None,
                 run_name: str = "", config: dict | None = None):
        self.enabled = enabled
        self.path = Path(output_dir) / METRICS_FILE
        self.queue = queue
        self.wandb_cfg = wandb
        self.run_name = run_name
        self.config = config or {}
        self._run = None
        # W&B commits a step's row when a later step arrives (or at finish). Steps committed by
        # earlier attempts are not sent again: a resume recomputes them bitwise identically.
        self._wandb_committed = -1
        self._wandb_step = -1

    def start(self, *, start_step: int, wandb_run_id: str, resumed_from: Path | None,
              attachments: dict | None = None) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        truncate_after(self.path, start_step)
        if self.wandb_cfg is not None and wandb_mode(self.wandb_cfg) != "disabled":
            self._run = self._init_wandb(wandb_run_id)
            self._run.config.update(attachments or {}, allow_val_change=True)
            step_file = self.path.parent / WANDB_STEP_FILE
            self._wandb_committed = int(step_file.read_text()) if step_file.is_file() else -1
        self._send({"event": "start", "start_step": start_step,
                    "resumed_from": str(resumed_from) if resumed_from else None})

    def _init_wandb(self, run_id: str):
        import wandb

        cfg = self.wandb_cfg
        return wandb.init(
            project=cfg.project, entity=cfg.entity, name=cfg.name or self.run_name, group=cfg.group,
            tags=cfg.tags or None, id=run_id, resume="allow", mode=wandb_mode(cfg),
            dir=str(self.path.parent), config=self.config,
            settings=wandb.Settings(console="off", x_disable_stats=False),
        )

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = _clean({**row, "time": round(time.time(), 3)})
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self._run is not None and row["step"] > self._wandb_committed:
            if row["step"] > self._wandb_step >= 0:
                self._note_committed(self._wandb_step)
            self._wandb_step = row["step"]
            self._run.log({k: v for k, v in row.items() if k not in ("step", "time")}, step=row["step"])
        self._send({"event": "metrics", **row})

    def finish(self, summary: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._run is not None:
            self._run.summary.update(_clean(summary))
            self._run.finish()
            self._note_committed(self._wandb_step)
        self._send({"event": "finish", **summary})

    def _note_committed(self, step: int) -> None:
        (self.path.parent / WANDB_STEP_FILE).write_text(str(step))

    def _send(self, message: dict[str, Any]) -> None:
        if self.queue is not None:
            self.queue.put_nowait(message)
