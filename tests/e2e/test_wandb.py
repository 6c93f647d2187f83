"""W&B in offline mode: one run per job that survives a worker being killed,
with complete, strictly increasing steps; the API key never reaches an output."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import FULL, STEPS, launch
from tests.utils.wandb_offline import history_keys, history_steps

pytestmark = pytest.mark.e2e

PLANTED_KEY = "planted0secret0key0" + "9" * 21  # 40 characters, like a real W&B key


def test_one_run_with_increasing_steps_across_a_restart(ray_cluster, tmp_path):
    out = tmp_path / "wandb"
    result = launch(FULL, out, "--set=logging.wandb.mode=offline", "--set=fault_tolerance.max_restarts=2",
                    address=ray_cluster.address,
                    env={"TUNEFLEET_FAULT": "rank=1,step=13,kind=sigkill", "WANDB_API_KEY": PLANTED_KEY})
    # A relaunch of the finished run continues the same run and adds no steps.
    launch(FULL, out, "--set=logging.wandb.mode=offline", address=ray_cluster.address)
    assert (out / ".fault-rank1-step13-step").exists()
    runs = history_steps(out / "wandb")
    assert len(runs) == 1, runs
    (steps,) = runs.values()
    assert steps == list(range(0, STEPS + 1))
    assert len(list((out / "wandb").glob("offline-run-*"))) == 2  # one per launch (restarts share one)
    keys = history_keys(out / "wandb")
    assert {"loss", "eval_loss", "tokens_per_s", "mfu", "packing_efficiency", "restarts"} <= keys
    for rank in (0, 1):  # per-rank system metrics, grouped by rank in the one run
        assert {f"rank_{rank}/held_bytes", f"rank_{rank}/rss_bytes"} <= keys, sorted(keys)

    leaks = [str(p) for p in out.rglob("*") if p.is_file() and PLANTED_KEY.encode() in p.read_bytes()]
    assert not leaks, f"API key written to {leaks}"
    assert PLANTED_KEY not in result.stdout + result.stderr
