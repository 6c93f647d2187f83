"""Early stopping, the best checkpoint as final/, and `tunefleet eval` on exported models,
through the real CLI on the session's Ray cluster."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import REPO, tunefleet
from tests.e2e.conftest import FULL, LORA, assert_bitwise_equal, final_weights, launch, read_metrics

pytestmark = pytest.mark.e2e

# `max` on the eval loss: the first evaluation after training starts (step 4) stays the best while the
# loss falls, so two evaluations later (step 12) the run stops, well before max_steps (24).
EARLY_STOP = [
    "--set=train.eval_every_steps=4", "--set=data.eval.metric_direction=max",
    "--set=data.eval.early_stopping_patience=2", "--set=checkpoint.keep_best=true",
    "--set=checkpoint.final_from=best", "--set=checkpoint.every_steps=4", "--set=checkpoint.keep_last=1",
]


def evaluate(target: Path, data: str, out: Path, address: str, *extra: str) -> dict:
    result = tunefleet("eval", str(target), "--data", str(REPO / data), "--output", str(out),
                       "--address", address, *extra)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "eval_loss" in result.stdout
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def stopped_run(ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("early-stop") / "run"
    result = launch(FULL, out, *EARLY_STOP, address=ray_cluster.address)
    return out, result


def test_early_stopping_stops_and_exports_the_best_checkpoint(stopped_run, ray_cluster, tmp_path):
    out, result = stopped_run
    train, evals = read_metrics(out)
    assert [r["step"] for r in evals] == [0, 4, 8, 12]
    assert train[-1]["step"] == 12
    assert "stopped early at step 12 of 24" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["stopped_early_at"], summary["best_step"], summary["final_from_step"]) == (12, 4, 4)
    assert summary["best_value"] == evals[1]["eval_loss"]
    listed = tunefleet("runs", str(out))
    assert listed.returncode == 0 and "stopped early" in listed.stdout and "12/24" in listed.stdout, listed.stdout
    # The best (step 4) survives pruning to keep_last 1; step 8 does not.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_12", "step_4"]
    best = tmp_path / "best"
    exported = tunefleet("export", str(out), "--step", "4", "--out", str(best))
    assert exported.returncode == 0, exported.stderr
    assert_bitwise_equal(final_weights(out), load_file(best / "model.safetensors"))


def test_relaunching_a_stopped_run_trains_no_further(stopped_run, ray_cluster):
    out, _ = stopped_run
    before = final_weights(out)
    result = launch(FULL, out, *EARLY_STOP, address=ray_cluster.address)
    assert "stopped early at step 12" in result.stdout
    train, evals = read_metrics(out)
    assert max(r["step"] for r in train + evals) == 12
    assert_bitwise_equal(final_weights(out), before)


def test_eval_of_a_run_gives_its_best_evaluation(stopped_run, ray_cluster, tmp_path):
    out, _ = stopped_run
    report = evaluate(out, "recipes/tiny/data/alpaca_eval.jsonl", tmp_path / "eval.json", ray_cluster.address)
    _, evals = read_metrics(out)
    assert report["model"] == str(out / "final") and report["eval_rows"] == 128  # the recipe's max_rows
    assert report["metrics"]["eval_loss"] == pytest.approx(evals[1]["eval_loss"], rel=1e-6)


def test_eval_of_a_lora_adapter_folder_gives_the_final_evaluation(ray_cluster, tmp_path):
    out = tmp_path / "lora"
    launch(LORA, out, "--set=train.max_steps=8", "--set=train.warmup_steps=2", "--set=train.eval_every_steps=4",
           address=ray_cluster.address)
    assert (out / "final" / "adapter_config.json").is_file()
    _, evals = read_metrics(out)
    # The adapter folder itself: its recipe is the run's, found next to it.
    report = evaluate(out / "final", "recipes/tiny/data/chat_eval.jsonl", tmp_path / "eval.json",
                      ray_cluster.address, "--metric", "eval_loss")
    assert evals[-1]["step"] == 8
    assert report["metrics"] == {"eval_loss": pytest.approx(evals[-1]["eval_loss"], rel=1e-6)}
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]  # the adapter was trained: not the base's figure
