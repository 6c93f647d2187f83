"""The embedded Ray's quiet settings (run/session.py): what an embedded Ray without its dashboard is started with."""

from __future__ import annotations

from tests.conftest import REPO
from tunefleet.launcher.config import load_recipe
from tunefleet.launcher.run.session import QUIET_EMBEDDED_RAY, quiet_ray_env

RECIPE = REPO / "recipes" / "tiny" / "llama-full-ddp.yaml"


def test_an_embedded_ray_without_dashboard_is_started_quiet(tmp_path):
    recipe = load_recipe(RECIPE, [f"output_dir={tmp_path}"])
    assert quiet_ray_env(recipe, {}) == QUIET_EMBEDDED_RAY
    assert quiet_ray_env(recipe, {})["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"


def test_the_users_settings_and_the_dashboard_win(tmp_path):
    recipe = load_recipe(RECIPE, [f"output_dir={tmp_path}"])
    chosen = quiet_ray_env(recipe, {"RAY_enable_metrics_collection": "1"})
    assert "RAY_enable_metrics_collection" not in chosen and len(chosen) == len(QUIET_EMBEDDED_RAY) - 1
    with_dashboard = load_recipe(RECIPE, [f"output_dir={tmp_path}", "cluster.dashboard=true"])
    assert quiet_ray_env(with_dashboard, {}) == {}
