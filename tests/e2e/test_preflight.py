"""Preflight on real Ray workers: a passing report is recorded; a failing check
stops the job with the node named and no restarts spent."""

from __future__ import annotations

import json

import pytest

from tests.conftest import tunefleet
from tests.e2e.conftest import COMMON, FULL

pytestmark = pytest.mark.e2e


def test_unwritable_checkpoint_dir_fails_fast_naming_the_node(ray_cluster, tmp_path):
    out = tmp_path / "run"
    result = tunefleet("launch", FULL, f"--set=output_dir={out}", *COMMON, "--set=checkpoint.dir=/proc/tunefleet",
                       "--set=fault_tolerance.max_restarts=3", "--address", ray_cluster.address)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "preflight failed" in result.stderr
    assert "(rank 0): cannot write to /proc/tunefleet" in result.stderr
    assert "(rank 1): cannot write" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / "metrics.jsonl").exists(), "training must not have started"


def test_passing_preflight_is_recorded(baseline_full):
    report = json.loads((baseline_full[0] / "preflight.json").read_text())
    assert report["all_reduce_gbps"] > 0
    assert report["versions"]["torch"].startswith("2.")
    assert len(report["nodes"]) == 1
