"""Several Ray nodes on this machine: one worker per node (STRICT_SPREAD), and
losing a node mid-run, with and without `parallelism.min_workers`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest

from tests.conftest import BIN, FAST_HEALTH_CHECKS, RayCluster
from tests.e2e.conftest import COMMON, FULL, STEPS, read_metrics
from tunefleet.launcher.training import failures

# Each test spans a multi-node run, a node death (detection, restart) and a replacement: more than the
# default 600 s per-test limit on a loaded 2-core machine.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

TWO_NODES = ["--set=parallelism.num_nodes=2", "--set=parallelism.workers_per_node=1",
             "--set=train.grad_accum_steps=2", "--set=fault_tolerance.max_restarts=3"]


@pytest.fixture
def cluster():
    """A head that runs no training (0 CPUs) plus two 1-CPU worker nodes."""
    cluster = RayCluster(num_cpus=0, env=FAST_HEALTH_CHECKS)
    cluster.add_node()
    cluster.add_node()
    cluster.wait_for_nodes(3)
    yield cluster
    cluster.stop()


def start_launch(cluster, out, *extra, pause_after: int | None = None) -> subprocess.Popen:
    """`tunefleet launch` on the cluster; ``pause_after``: rank 1 stalls once after that step, so a node
    killed then dies mid-run however fast the steps are (the tiny model takes about 0.1 s a step)."""
    env = {**os.environ, "TUNEFLEET_FAULT": f"rank=1,step={pause_after},kind=stall"} if pause_after else None
    return subprocess.Popen(
        [str(BIN / "tunefleet"), "launch", FULL, f"--set=output_dir={out}", *COMMON, *TWO_NODES, *extra,
         "--address", cluster.address],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def wait_for_step(out, step: int, proc, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and len(read_metrics(out)[0]) >= step:
            return
        time.sleep(0.2)
    raise AssertionError(f"run never reached step {step}")


def node_of_rank(cluster, out, rank: int) -> subprocess.Popen:
    """The `ray start` process of the node that runs this rank (its worker is in that node's session)."""
    pid = json.loads((out / failures.WORKERS_DIR / f"rank{rank}.json").read_text())["pid"]
    return next(node for node in cluster.nodes if os.getsid(pid) == node.pid)


def finish(proc) -> str:
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-4000:]
    return stdout


def assert_complete(out) -> None:
    assert [r["step"] for r in read_metrics(out)[0]] == list(range(1, STEPS + 1))
    assert (out / "final" / "model.safetensors").is_file()


def test_one_worker_per_node_trains_to_completion(cluster, tmp_path):
    out = tmp_path / "spread"
    finish(start_launch(cluster, out))
    assert_complete(out)
    assert len(json.loads((out / "preflight.json").read_text())["nodes"]) == 2


def test_node_loss_continues_on_fewer_workers_with_min_workers(cluster, tmp_path):
    out = tmp_path / "shrink"
    proc = start_launch(cluster, out, "--set=parallelism.min_workers=1", pause_after=10)
    wait_for_step(out, 10, proc)  # past the step-8 checkpoint, paused before step 11
    # the node of the paused rank: rank 0, waiting on it in a collective, fails at once with "Connection
    # closed by peer", before the cluster has noticed the node is gone; the line must name the node's loss
    RayCluster.kill(node_of_rank(cluster, out, 1))
    stdout = finish(proc)
    assert "restart 1/" in stdout and " from " in stdout and "step_8" in stdout
    lost = r"worker failed: rank 1 on node [\d.]+ \(id \w{8}, pid \d+\) was lost with its node"
    assert re.search(lost, stdout), stdout
    assert_complete(out)


def test_node_loss_waits_for_a_replacement_without_min_workers(cluster, tmp_path):
    out = tmp_path / "replace"
    proc = start_launch(cluster, out, pause_after=10)
    wait_for_step(out, 10, proc)
    RayCluster.kill(node_of_rank(cluster, out, 1))
    cluster.wait_for_nodes(2)
    time.sleep(5)
    last_before = len(read_metrics(out)[0])
    assert proc.poll() is None, "the run must wait, not fail"
    cluster.add_node()
    stdout = finish(proc)
    assert "restart 1/" in stdout and " from " in stdout
    assert_complete(out)
    assert last_before < STEPS
