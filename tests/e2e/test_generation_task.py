"""Generation eval that can fail: the tiny Llama learns the shipped capitals table
(recipes/tiny/llama-capitals-ddp.yaml) and its greedy answers to an unseen phrasing
go from none right to most of the table. One strategy here (each launch costs about two minutes); generation
under fsdp and ZeRO-3 is checked rank by rank in tests/dist/test_generation.py."""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import launch, read_metrics

pytestmark = pytest.mark.e2e

CAPITALS = "recipes/tiny/llama-capitals-ddp.yaml"


def test_exact_match_rises_on_the_capitals_task(ray_cluster, tmp_path, strategy="ddp"):
    out = tmp_path / strategy
    result = launch(CAPITALS, out, f"--set=parallelism.strategy={strategy}", "--set=train.max_steps=200",
                    "--set=train.eval_every_steps=100", "--set=checkpoint.every_steps=null",
                    address=ray_cluster.address)
    assert f"strategy {strategy}" in result.stdout
    _, evals = read_metrics(out)
    assert [e["step"] for e in evals] == [0, 100, 200]
    summary = json.loads((out / "summary.json").read_text())
    # Measured over the 24 eval prompts (train.seed 0-2 under DDP, seed 0 under FSDP and ZeRO-3): exact match
    # 0.0 at random init and 1.0 at steps 100 and 200; the thresholds leave room for several prompts either way.
    assert summary["eval_exact_match_before"] <= 0.05, summary
    assert summary["eval_exact_match_after"] >= 0.75, summary
    assert summary["eval_contains_match_after"] >= summary["eval_exact_match_after"]
    assert "eval exact match after" in result.stdout
