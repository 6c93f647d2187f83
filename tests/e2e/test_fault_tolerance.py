"""Faults on a real local Ray: the run restarts from the latest complete
checkpoint and ends bitwise identical to an uninterrupted run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.e2e.conftest import FULL, STEPS, assert_bitwise_equal, final_weights, launch, read_metrics

pytestmark = pytest.mark.e2e


def faulty_run(ray_cluster, out, fault: str, max_restarts: int = 2):
    return launch(FULL, out, f"--set=fault_tolerance.max_restarts={max_restarts}", address=ray_cluster.address,
                  env={"TUNEFLEET_FAULT": fault})


def line_naming(lines: list[str], *texts: str) -> int | None:
    """Index of the first line holding every one of ``texts``; None when none does."""
    return next((i for i, line in enumerate(lines) if all(text in line for text in texts)), None)


def assert_clean_metrics(out):
    train, evals = read_metrics(out)
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert [r["step"] for r in evals] == [0, 12, STEPS]


def test_sigkill_of_a_worker_mid_run_resumes_bitwise(baseline_full, ray_cluster, tmp_path):
    out = tmp_path / "killed"
    result = faulty_run(ray_cluster, out, "rank=1,step=13,kind=sigkill")
    assert (out / ".fault-rank1-step13-step").exists(), "the fault never fired"
    # one line for the event, Ray's tracebacks in the run folder's log instead of on the console
    # one line naming the rank, its node and how it died, then the restart
    assert re.search(r"worker failed: rank 1 on node [\d.]+ \(id \w{8}, pid \d+\) was killed without a Python error",
                     result.stdout), result.stdout
    assert "restart 1/2 from" in result.stdout and "step_8" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert "Traceback" in (out / "launch.log").read_text()
    assert json.loads((out / "summary.json").read_text())["restarts"] == 1
    assert_bitwise_equal(final_weights(out), final_weights(baseline_full[0]))
    assert_clean_metrics(out)
    baseline_losses = [r["loss"] for r in read_metrics(baseline_full[0])[0]]
    assert [r["loss"] for r in read_metrics(out)[0]] == baseline_losses
    assert [r["restarts"] for r in read_metrics(out)[0]] == [0] * 8 + [1] * (STEPS - 8)


def test_sigkill_while_writing_a_checkpoint_ignores_the_partial_one(baseline_full, ray_cluster, tmp_path):
    out = tmp_path / "killed-in-save"
    result = faulty_run(ray_cluster, out, "rank=0,step=16,kind=sigkill,at=checkpoint")
    assert (out / ".fault-rank0-step16-checkpoint").exists(), "the fault never fired"
    assert "step_8" in result.stdout  # resumed from the complete one before the half-written step_16
    assert_bitwise_equal(final_weights(out), final_weights(baseline_full[0]))
    assert_clean_metrics(out)
    assert not list((out / "checkpoints").glob(".partial-*"))


def test_each_way_a_worker_ends_is_named_and_the_run_resumes_bitwise(baseline_full, ray_cluster, tmp_path):
    """Three faults in one launch, each restarting the group: a SIGTERM to a rank (step 5, before the first
    checkpoint: the restart begins again at step 1), a segfault (a broken kernel, a bad extension; step 11) named
    with its traceback file, and a raised exception (step 20) named with its message."""
    out = tmp_path / "three-faults"
    three = "rank=0,step=5,kind=sigterm;rank=1,step=11,kind=segv;rank=0,step=20,kind=raise"
    result = faulty_run(ray_cluster, out, three, max_restarts=3)
    for marker in (".fault-rank0-step5-step", ".fault-rank1-step11-step", ".fault-rank0-step20-step"):
        assert (out / marker).exists(), f"{marker}: the fault never fired"
    failures = [line for line in result.stdout.splitlines() if "worker failed: " in line]
    sigterm = line_naming(failures, "rank 0 on node", "received SIGTERM")
    segv = line_naming(failures, "rank 1 on node", "crashed: SIGSEGV (segmentation fault) (traceback: ")
    raised = line_naming(failures, "rank 0 on node", "raised InjectedFault: injected fault at rank 0, step 20")
    assert None not in (sigterm, segv, raised) and sigterm < segv < raised, result.stdout
    traceback = Path(re.search(r"\(traceback: (\S+)\)", failures[segv]).group(1)).read_text()
    assert "Fatal Python error: Segmentation fault" in traceback
    assert "maybe_inject" in traceback  # where it crashed
    assert "restart 3/3 from" in result.stdout and "step_16" in result.stdout
    assert json.loads((out / "summary.json").read_text())["restarts"] == 3
    assert_bitwise_equal(final_weights(out), final_weights(baseline_full[0]))
    assert_clean_metrics(out)


def test_sigterm_checkpoints_exits_75_and_the_next_launch_resumes(baseline_full, ray_cluster, tmp_path):
    import os
    import signal
    import subprocess
    import time

    from tests.conftest import BIN
    from tests.e2e.conftest import COMMON

    out = tmp_path / "preempted"
    proc = subprocess.Popen(
        [str(BIN / "tunefleet"), "launch", FULL, f"--set=output_dir={out}", *COMMON,
         "--address", ray_cluster.address],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(read_metrics(out)[0]) >= 3:
            break
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 75, stdout[-2000:] + stderr[-3000:]
    assert "preempted: checkpoint saved at step" in stderr
    saved = int(stderr.split("checkpoint saved at step ")[1].split(";")[0])
    assert 3 <= saved < STEPS and (out / "checkpoints" / f"step_{saved}" / "COMPLETE").is_file()

    launch(FULL, out, address=ray_cluster.address)
    assert_bitwise_equal(final_weights(out), final_weights(baseline_full[0]))
    assert_clean_metrics(out)


def test_async_checkpoints_resume_bitwise_after_sigkill(baseline_full, ray_cluster, tmp_path):
    out = tmp_path / "async"
    launch(FULL, out, "--set=checkpoint.async=true", "--set=fault_tolerance.max_restarts=2",
           address=ray_cluster.address, env={"TUNEFLEET_FAULT": "rank=0,step=19,kind=sigkill"})
    assert (out / ".fault-rank0-step19-step").exists()
    assert_bitwise_equal(final_weights(out), final_weights(baseline_full[0]))
    assert_clean_metrics(out)
    stalls = [r for r in _rows(out) if "checkpoint_stall_s" in r]
    assert {r["step"] for r in stalls} >= {16, 24}


def _rows(out):
    import json

    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
