"""`tunefleet launch` through the real CLI on a real local Ray, 2 workers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import tunefleet
from tests.e2e.conftest import FULL, LORA, STEPS, launch, read_metrics

pytestmark = pytest.mark.e2e


def check_run(run_dir: Path) -> tuple[list[dict], list[dict]]:
    train, evals = read_metrics(run_dir)
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    for row in train:
        assert {"step", "loss", "lr", "tokens_per_s", "grad_norm", "samples_per_s", "step_time_s"} <= row.keys()
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1 and row["restarts"] == 0
        assert 0 < row["packing_efficiency"] < 1  # unpacked rows padded to the longest in each batch
        assert len(row["held_bytes_per_rank"]) == 2 and min(row["held_bytes_per_rank"]) > 0
        assert min(row["peak_rss_bytes_per_rank"]) >= min(row["rss_bytes_per_rank"]) > 0
    assert [r["step"] for r in evals] == [0, 12, STEPS]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.5, evals
    resolved = yaml.safe_load((run_dir / "recipe.resolved.yaml").read_text())
    assert resolved["train"]["max_steps"] == STEPS
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == STEPS
    return train, evals


def final_eval_logits(model) -> torch.Tensor:
    ids = torch.arange(5, 25).reshape(2, 10)
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def full_run(baseline_full):
    return baseline_full


def test_full_finetune_trains_and_exports(full_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, result = full_run
    check_run(out)
    assert "tunefleet run summary" in result.stdout
    # the console holds tunefleet's header, progress and summary; Ray's and the libraries' chatter is in the log
    chatter = ("Warning", "WARNING", "wandb:", "core_worker", "Traceback", "(RayTrainWorker")
    assert not [line for line in (result.stdout + result.stderr).splitlines() if any(c in line for c in chatter)]
    assert len(result.stdout.splitlines()) < 45, result.stdout
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    AutoTokenizer.from_pretrained(out / "final")
    assert torch.isfinite(final_eval_logits(model)).all()
    assert (out / "final" / "model.safetensors").is_file()


def test_same_seed_gives_same_losses(full_run, ray_cluster, tmp_path):
    first, _ = read_metrics(full_run[0])
    launch(FULL, tmp_path / "again", address=ray_cluster.address)
    second, _ = read_metrics(tmp_path / "again")
    assert [r["loss"] for r in first] == [r["loss"] for r in second]


def test_lora_on_embedded_ray(tmp_path):
    """No --address and no RAY_ADDRESS: tunefleet starts its own Ray."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    result = launch(LORA, out, "--set=logging.wandb.mode=offline")
    check_run(out)
    # Started without Ray's dashboard unless cluster.dashboard asks for it (test_secrets.py turns it on).
    assert json.loads((out / "run.json").read_text())["ray_dashboard"] is None
    assert "Ray dashboard" not in result.stdout
    # Without a dashboard there is no State API: Ray Train's placement-group cleaner, which asks it every
    # second, is left out rather than logging a failure each time (run/trainer.py).
    assert "Failed to query Ray Train Controller" not in (out / "launch.log").read_text()
    assert len(list((out / "wandb").glob("offline-run-*"))) == 1
    final = out / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    base_path = json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = AutoModelForCausalLM.from_pretrained(base_path)
    before = final_eval_logits(base)
    tuned = PeftModel.from_pretrained(base, final)
    assert not torch.allclose(final_eval_logits(tuned), before)


def test_resume_never_refuses_existing_checkpoints(full_run):
    out, _ = full_run
    result = tunefleet("launch", FULL, f"--set=output_dir={out}", "--resume", "never")
    assert result.returncode == 2
    assert "already holds checkpoints" in result.stderr and "Traceback" not in result.stderr


def test_relaunch_of_finished_run_resumes_at_the_end(full_run, ray_cluster):
    """Re-running a finished recipe picks up its last checkpoint and trains nothing more."""
    out, _ = full_run
    before = (out / "metrics.jsonl").read_text()
    launch(FULL, out, address=ray_cluster.address)
    train, _ = read_metrics(out)
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert (out / "metrics.jsonl").read_text().splitlines()[: STEPS] == before.splitlines()[: STEPS]



def test_runs_lists_the_finished_run(full_run):
    out, _ = full_run
    result = tunefleet("runs", str(out.parent))
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if "tiny-llama-full-ddp" in line)
    assert "finished" in line and f"{STEPS}/{STEPS}" in line and f"step_{STEPS}" in line


def test_plan_measures_steps_and_forecasts(ray_cluster):
    result = tunefleet("plan", FULL, "--measure-steps", "4", "--json", "--address", ray_cluster.address)
    assert result.returncode == 0, result.stderr[-3000:]
    forecast = json.loads(result.stdout[result.stdout.index("{"):])["forecast"]
    assert forecast["measured_steps"] == 4
    # step_time_s is rounded to 1 ms, the forecast to 0.1 s: 120 steps x 0.5 ms + 0.05 s.
    assert forecast["forecast_train_s"] == pytest.approx(forecast["step_time_s"] * 120, abs=0.15)
    assert forecast["tokens_to_train"] > 0
