"""GRPO end to end on the shipped capitals task (recipes/tiny/llama-capitals-grpo.yaml): from a short SFT
run's exported model, online RL with the exact-match reward raises held-out exact match (greedy, an
unseen phrasing); a SIGKILLed GRPO run resumes bitwise identical (rollouts are seeded by step and rank);
a reward that cannot work stops the launch before Ray starts."""

from __future__ import annotations

import json

import pytest

from tests.conftest import tunefleet
from tests.e2e.conftest import assert_bitwise_equal, final_weights, launch, read_metrics

pytestmark = pytest.mark.e2e

SFT = "recipes/tiny/llama-capitals-ddp.yaml"
GRPO = "recipes/tiny/llama-capitals-grpo.yaml"
SFT_STEPS = 60  # measured: held-out exact match 0.17 (neither 0 nor 1), sampled train reward ~0.04


@pytest.fixture(scope="module")
def sft_model(ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("capitals-sft") / "run"
    launch(SFT, out, f"--set=train.max_steps={SFT_STEPS}", "--set=train.eval_every_steps=null",
           "--set=checkpoint.every_steps=null", address=ray_cluster.address)
    return out / "final"


def grpo_launch(ray_cluster, sft_model, out, *extra, env=None):
    return launch(GRPO, out, f"--set=model.path={sft_model}", *extra, address=ray_cluster.address, env=env)


def test_grpo_raises_held_out_exact_match(ray_cluster, sft_model, tmp_path):
    out = tmp_path / "grpo"
    result = grpo_launch(ray_cluster, sft_model, out, "--set=train.max_steps=100", "--set=train.eval_every_steps=50",
                         "--set=checkpoint.every_steps=null")
    summary = json.loads((out / "summary.json").read_text())
    # Measured (train.seed 0, 1, 2): see docs/methods.md; the threshold is the issue's.
    assert summary["eval_exact_match_after"] - summary["eval_exact_match_before"] >= 0.2, summary
    train, evals = read_metrics(out)
    assert [e["step"] for e in evals] == [0, 50, 100]
    first, last = train[:10], train[-10:]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    assert mean(last, "reward_mean") > mean(first, "reward_mean") + 0.1
    for key in ("reward_std", "reward_exact_match", "kl", "clip_fraction", "entropy", "completion_len",
                "rollout_s", "optimize_s", "zero_std_groups"):
        assert key in train[-1], key
    assert 0 < mean(last, "kl") < 2.0  # moved from the SFT weights, and the KL term keeps it bounded
    assert "eval exact match after" in result.stdout


def test_grpo_resumes_bitwise_after_sigkill(ray_cluster, sft_model, tmp_path):
    steps = ["--set=train.max_steps=8", "--set=train.eval_every_steps=null", "--set=checkpoint.every_steps=4",
             "--set=fault_tolerance.max_restarts=2"]
    baseline = tmp_path / "baseline"
    grpo_launch(ray_cluster, sft_model, baseline, *steps)
    killed = tmp_path / "killed"
    result = grpo_launch(ray_cluster, sft_model, killed, *steps, env={"TUNEFLEET_FAULT": "rank=1,step=6,kind=sigkill"})
    assert (killed / ".fault-rank1-step6-step").exists(), "the fault never fired"
    assert "restart 1/2 from" in result.stdout and "step_4" in result.stdout
    assert_bitwise_equal(final_weights(killed), final_weights(baseline))
    keys = ("loss", "reward_mean", "kl", "completion_len")
    assert [[r[k] for k in keys] for r in read_metrics(killed)[0]] == [[r[k] for k in keys]
                                                                       for r in read_metrics(baseline)[0]]


def test_a_reward_returning_no_number_stops_the_launch_before_ray(tmp_path):
    (tmp_path / "my_rewards.py").write_text("def score(prompt, completion, row):\n    return 'high'\n")
    result = tunefleet("launch", GRPO, "--set=model.path=tiny:llama", "--set=method.rl.reward=[my_rewards:score]",
                       f"--set=output_dir={tmp_path / 'run'}", env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 2, result.stderr
    assert "method.rl.reward: reward 'my_rewards:score' returned 'high' (str)" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()
