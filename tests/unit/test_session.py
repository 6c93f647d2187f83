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


def test_a_module_preloaded_in_the_background_is_imported_and_a_failure_left_to_the_real_import(tmp_path, monkeypatch):
    import sys

    from tunefleet.launcher.run.session import preload_in_background

    (tmp_path / "tf_preloaded_probe.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tf_preloaded_probe", raising=False)
    preload_in_background("tf_preloaded_probe").join(timeout=30)
    assert sys.modules["tf_preloaded_probe"].VALUE == 1
    # A module that cannot be imported leaves no trace on the thread; the real import raises where it is used.
    preload_in_background("tf_no_such_module_here").join(timeout=30)
    assert "tf_no_such_module_here" not in sys.modules
