"""The best evaluation: tracking and patience, its checkpoint meta round trip, pruning that keeps
the best checkpoint, the recipe rules of keep_best / early stopping / final_from, and
`tunefleet eval`'s user errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, tunefleet
from tunefleet.launcher.config import MethodConfig, load_recipe
from tunefleet.launcher.errors import RecipeError, UserError
from tunefleet.launcher.evaluation.best_metric import BestMetric
from tunefleet.launcher.training import checkpoint
from tunefleet.launcher.training.checkpoint import CheckpointManager

from .test_checkpoint import FileStrategy

TINY = REPO / "recipes" / "tiny" / "llama-full-ddp.yaml"
CLASSIFY = REPO / "recipes" / "tiny" / "llama-classify-ddp.yaml"


# ----------------------------------------------------------------------------- tracking
def test_min_metric_tracks_best_and_counts_evaluations_without_improvement():
    best = BestMetric(metric="eval_loss", direction="min", patience=2)
    assert not best.update(0, 1.0)  # the baseline before training is never the best
    assert best.step is None and best.evals_without_improvement == 0
    assert best.update(4, 3.0) and best.update(8, 2.5)
    assert not best.update(12, 2.5)  # equal is not better
    assert not best.should_stop
    assert not best.update(16, 2.7)
    assert best.should_stop and (best.value, best.step) == (2.5, 8)


def test_max_metric_and_a_recovery_resets_the_count():
    best = BestMetric(metric="eval_accuracy", direction="max", patience=2)
    best.update(1, 0.5)
    best.update(2, 0.4)
    assert best.update(3, 0.6) and best.evals_without_improvement == 0 and not best.should_stop
    assert not best.update(4, math.nan)  # a NaN evaluation never wins
    assert best.step == 3


def test_without_patience_never_stops():
    best = BestMetric(metric="eval_loss", direction="min")
    best.update(1, 1.0)
    for step in range(2, 20):
        best.update(step, 2.0)
    assert not best.should_stop


def test_state_round_trips_through_checkpoint_meta(tmp_path):
    best = BestMetric(metric="eval_loss", direction="min", patience=3)
    best.update(4, 2.0)
    best.update(8, 2.2)
    manager = CheckpointManager(str(tmp_path), keep_last=1, keep_best=True)
    manager.save(8, FileStrategy(), {"world_size": 1, "best": best.state()})
    resumed = BestMetric(metric="eval_loss", direction="min", patience=3)
    resumed.restore(checkpoint.read_meta(tmp_path / "step_8")["best"])
    assert resumed == best
    assert json.loads((tmp_path / "step_8" / "meta.json").read_text())["best"]["step"] == 4


def test_restore_ignores_state_of_another_metric():
    best = BestMetric(metric="eval_loss", direction="min")
    best.update(4, 2.0)
    other = BestMetric(metric="eval_accuracy", direction="max")
    other.restore(best.state())
    assert other.step is None and other.value is None


# ----------------------------------------------------------------------------- pruning
def save_with_best(manager: CheckpointManager, step: int, best_step: int | None) -> None:
    manager.save(step, FileStrategy(float(step)), {"world_size": 1, "best": {"step": best_step}})


def test_prune_keeps_the_best_checkpoint_besides_the_last(tmp_path):
    manager = CheckpointManager(str(tmp_path), keep_last=1, keep_best=True)
    for step in (2, 4, 6, 8):
        save_with_best(manager, step, best_step=4 if step >= 4 else 2)
    assert checkpoint.complete_steps(tmp_path) == [4, 8]
    save_with_best(manager, 10, best_step=10)  # a new best: the old one goes
    assert checkpoint.complete_steps(tmp_path) == [10]


def test_prune_without_keep_best_ignores_the_recorded_best(tmp_path):
    manager = CheckpointManager(str(tmp_path), keep_last=1)
    for step in (2, 4, 6):
        save_with_best(manager, step, best_step=2)
    assert checkpoint.complete_steps(tmp_path) == [6]


def test_a_new_manager_protects_the_best_recorded_on_disk(tmp_path):
    """After a resume the manager learns the best step from the newest checkpoint."""
    save_with_best(CheckpointManager(str(tmp_path), keep_last=5, keep_best=True), 2, best_step=2)
    save_with_best(CheckpointManager(str(tmp_path), keep_last=5, keep_best=True), 4, best_step=2)
    resumed = CheckpointManager(str(tmp_path), keep_last=1, keep_best=True)
    save_with_best(resumed, 6, best_step=2)
    assert checkpoint.complete_steps(tmp_path) == [2, 6]


# ----------------------------------------------------------------------------- recipe rules
def problems(path, *overrides: str) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, list(overrides))
    return str(info.value)


def test_keep_best_and_patience_need_evaluations_during_training():
    message = problems(TINY, "checkpoint.keep_best=true", "data.eval.early_stopping_patience=2",
                       "train.eval_every_steps=null")
    assert "checkpoint.keep_best: follows evaluations during training; set train.eval_every_steps" in message
    assert "data.eval.early_stopping_patience: follows evaluations" in message
    message = problems(TINY, "checkpoint.keep_best=true", "data.eval=null")
    assert "checkpoint.keep_best: follows data.eval.metric, which needs held-out rows" in message
    message = problems(TINY, "data.eval.path=null", "data.eval.early_stopping_patience=2")
    assert "data.eval.early_stopping_patience: runs with the evaluation" in message


def test_final_from_best_needs_keep_best():
    assert "checkpoint.final_from: best needs checkpoint.keep_best: true" in problems(
        TINY, "checkpoint.final_from=best")
    assert "has no effect with checkpoint.export_final: false" in problems(
        TINY, "checkpoint.final_from=best", "checkpoint.keep_best=true", "checkpoint.export_final=false")


def test_metric_must_be_one_the_evaluation_reports():
    message = problems(TINY, "data.eval.metric=eval_accuracy", "checkpoint.keep_best=true")
    assert "data.eval.metric: eval_accuracy is not reported by this recipe's evaluation; choose one of eval_loss" \
        in message
    message = problems(CLASSIFY, "data.eval.metric=eval_exact_match")
    assert "choose one of eval_loss, eval_accuracy, eval_f1" in message


def test_direction_defaults_from_the_metric_name():
    recipe = load_recipe(CLASSIFY, ["data.eval.metric=eval_f1", "checkpoint.keep_best=true",
                                    "checkpoint.final_from=best", "data.eval.early_stopping_patience=3"])
    assert recipe.data.eval.direction == "max"
    tracked = BestMetric.for_run(recipe.data.eval, keep_best=recipe.checkpoint.keep_best)
    assert tracked == BestMetric(metric="eval_f1", direction="max", patience=3)
    assert load_recipe(TINY).data.eval.direction == "min"
    tiny = load_recipe(TINY)
    assert BestMetric.for_run(tiny.data.eval, keep_best=tiny.checkpoint.keep_best) is None
    flipped = load_recipe(TINY, ["data.eval.metric_direction=max", "checkpoint.keep_best=true"])
    assert flipped.data.eval.direction == "max"


@pytest.mark.parametrize("kind", ["bottleneck", "adapter"])
def test_bottleneck_adapters_are_refused_with_the_alternatives(kind):
    with pytest.raises(ValueError, match="peft provides no bottleneck .*use lora .*ia3"):
        MethodConfig(kind=kind)


# ----------------------------------------------------------------------------- `tunefleet eval` mistakes
@pytest.fixture
def run_dir(tmp_path):
    """A run folder as `tunefleet launch` leaves it, with a (fake) exported model."""
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "config.json").write_text("{}")
    recipe = load_recipe(TINY, [f"output_dir={run}"])
    (run / "recipe.resolved.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    return run


EVAL_DATA = str(REPO / "recipes" / "tiny" / "data" / "alpaca_eval.jsonl")


@pytest.mark.parametrize("case,expected", [
    ("missing_data", "--data /nonexistent.jsonl: file not found"),
    ("unknown_metric", "--metric eval_accuracy: not reported for this model and recipe; choose from eval_loss"),
    ("no_recipe", "no recorded recipe next to it; pass --recipe"),
    ("not_a_model", "is neither a run folder (recipe.resolved.yaml) nor a model or adapter folder"),
    ("adapter_mismatch", "holds a full model but the recipe says method.kind lora"),
])
def test_eval_mistakes_name_the_fix_before_ray_starts(run_dir, tmp_path, case, expected):
    from tunefleet.launcher.run.eval import run_eval

    target, data, metrics, overrides = run_dir, Path(EVAL_DATA), [], []
    if case == "missing_data":
        data = Path("/nonexistent.jsonl")
    elif case == "unknown_metric":
        metrics = ["eval_accuracy"]
    elif case == "no_recipe":
        target = tmp_path / "model"
        target.mkdir()
        (target / "config.json").write_text("{}")
    elif case == "not_a_model":
        target = tmp_path
    else:
        overrides = ["method.kind=lora"]
    with pytest.raises(UserError) as info:
        run_eval(target, data, metrics=metrics, overrides=overrides)
    assert expected in str(info.value)


def test_eval_of_a_missing_folder_exits_2_with_one_line(tmp_path):
    result = tunefleet("eval", str(tmp_path / "nowhere"), "--data", EVAL_DATA)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "not found; pass a run's output_dir or an exported model or adapter folder" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
