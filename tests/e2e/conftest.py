"""End-to-end helpers: launch a recipe through the real CLI and read its outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import tunefleet

STEPS = 24
COMMON = [
    f"--set=train.max_steps={STEPS}", "--set=train.eval_every_steps=12", "--set=logging.every_steps=1",
    "--set=logging.wandb.mode=disabled", "--set=checkpoint.every_steps=8", "--set=checkpoint.keep_last=3",
]
FULL = "recipes/tiny/llama-full-ddp.yaml"
LORA = "recipes/tiny/llama-lora-ddp.yaml"
REWARD = "recipes/tiny/llama-reward-ddp.yaml"


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]


def launch(recipe: str, out: Path, *extra: str, address: str | None = None, env: dict | None = None):
    args = ["launch", recipe, f"--set=output_dir={out}", *COMMON, *extra]
    if address:
        args += ["--address", address]
    result = tunefleet(*args, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def final_weights(run_dir: Path) -> dict:
    final = run_dir / "final"
    name = "adapter_model.safetensors" if (final / "adapter_config.json").exists() else "model.safetensors"
    return load_file(final / name)


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not (a[k].dtype == b[k].dtype and a[k].equal(b[k]))]
    assert not different, f"tensors differ: {different[:5]}"


@pytest.fixture(scope="session")
def baseline_full(ray_cluster, tmp_path_factory):
    """One uninterrupted full-DDP run that other tests compare against."""
    out = tmp_path_factory.mktemp("baseline-full") / "run"
    result = launch(FULL, out, address=ray_cluster.address)
    return out, result


@pytest.fixture(scope="session")
def reward_model(ray_cluster, tmp_path_factory):
    """A reward model trained by the shipped reward recipe (60 steps): tested itself, and PPO's reward."""
    out = tmp_path_factory.mktemp("reward-model") / "run"
    result = launch(REWARD, out, "--set=train.max_steps=60", "--set=train.eval_every_steps=30",
                    "--set=checkpoint.every_steps=null", address=ray_cluster.address)
    return out, result
