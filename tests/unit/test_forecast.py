"""The wall-time forecast from measured steps."""

from __future__ import annotations

import pytest

from tests.conftest import REPO
from tunefleet.launcher.config import load_recipe
from tunefleet.launcher.run.forecast import forecast


def test_forecast_scales_steady_state_steps_to_the_whole_run():
    recipe = load_recipe(REPO / "recipes/tiny/llama-full-ddp.yaml", ["train.max_steps=100"])
    rows = [{"step_time_s": 5.0, "tokens_per_s": 100.0}] + [{"step_time_s": 1.0, "tokens_per_s": 1000.0}] * 4
    result = forecast(recipe, rows, startup_s=20.0)
    assert result["step_time_s"] == 1.0 and result["tokens_per_s"] == 1000.0
    assert result["tokens_to_train"] == 100_000
    assert result["startup_s"] == pytest.approx(20.0 - 9.0)
    assert result["forecast_total_s"] == pytest.approx(100 + 11.0)
