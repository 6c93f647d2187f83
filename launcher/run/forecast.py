"""`tunefleet plan --measure-steps K`: run K real steps of the recipe on the
target cluster and forecast the wall time of the whole run from them."""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

from tunefleet.launcher.config import Recipe, load_recipe

MEASURE_OVERRIDES = [
    "train.warmup_steps=0", "train.eval_every_steps=null", "data.eval=null", "checkpoint.every_steps=null",
    "checkpoint.export_final=false", "logging.wandb.mode=disabled", "logging.every_steps=1",
    "fault_tolerance.max_restarts=0",
]


def measure(recipe_path: Path, overrides: list[str], num_steps: int, address: str | None) -> dict:
    """Launch ``num_steps`` steps into a scratch folder; return the forecast for the full run."""
    from tunefleet.launcher.run.driver import launch

    full = load_recipe(recipe_path, overrides)
    scratch = tempfile.mkdtemp(prefix="tunefleet-measure-")
    probe = load_recipe(recipe_path, [*overrides, *MEASURE_OVERRIDES, f"train.max_steps={num_steps}",
                                      f"output_dir={scratch}", "logging.console=false"])
    result = launch(probe, source=str(recipe_path), address=address)
    rows = [json.loads(line) for line in (Path(scratch) / "metrics.jsonl").read_text().splitlines()]
    return forecast(full, [r for r in rows if "loss" in r], startup_s=result.summary["wall_time_s"])


def forecast(recipe: Recipe, rows: list[dict], *, startup_s: float) -> dict:
    """Steady state = every measured step but the first (which pays for warm-up)."""
    steady = rows[1:] or rows
    step_s = statistics.median(r["step_time_s"] for r in steady)
    tokens_per_step = statistics.mean(r["tokens_per_s"] * r["step_time_s"] for r in steady)
    measured_s = sum(r["step_time_s"] for r in rows)
    return {
        "measured_steps": len(rows),
        "step_time_s": round(step_s, 3),
        "tokens_per_s": round(tokens_per_step / step_s, 1),
        "tokens_to_train": round(tokens_per_step * recipe.train.max_steps),
        "startup_s": round(max(startup_s - measured_s, 0.0), 1),
        "forecast_train_s": round(step_s * recipe.train.max_steps, 1),
        "forecast_total_s": round(step_s * recipe.train.max_steps + max(startup_s - measured_s, 0.0), 1),
    }
