"""Real Slurm clusters for the cluster-backend tests, one per session and shape,
plus helpers that submit through the real CLI and poll the scheduler."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

import tests.conftest as root
from tests.cluster.slurm_fixture import APT_PACKAGES, NetnsPair, SlurmCluster, SlurmNode, missing_binaries

TINY = "recipes/tiny/llama-full-ddp.yaml"


def tiny_overrides(out: Path, max_steps: int = 8) -> list[str]:
    return [f"--set=train.max_steps={max_steps}", "--set=train.warmup_steps=2", "--set=train.eval_every_steps=null",
            "--set=logging.every_steps=1", "--set=logging.wandb.mode=disabled", "--set=checkpoint.every_steps=4",
            f"--set=output_dir={out}"]


def _require_slurm() -> None:
    missing = missing_binaries()
    if missing:
        pytest.skip(f"Slurm is not installed here (missing: {', '.join(missing)}); .ci/run installs it with "
                    f"apt-get install -y --no-install-recommends {APT_PACKAGES}")


@pytest.fixture(scope="session")
def slurm_session():
    _require_slurm()
    cluster = SlurmCluster([SlurmNode("n1", cpus=2)]).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def slurm(slurm_session):
    """The one-node cluster, with no job of this test left behind."""
    yield slurm_session
    slurm_session.cancel_all_jobs()


@pytest.fixture(scope="session")
def slurm_two_hosts():
    """Two hosts h1 and h2 in their own network namespaces, one slurmd each; slurmctld on h1."""
    _require_slurm()
    netns = NetnsPair()
    nodes = [SlurmNode(name, addr=addr, cpus=1, netns=ns)
             for name, addr, ns in zip(("h1", "h2"), netns.addrs, netns.names, strict=True)]
    cluster = SlurmCluster(nodes)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
        netns.delete()


def cli(cluster: SlurmCluster, *args: str, env: dict | None = None, timeout: float = 300):
    """The real `tunefleet` console script, run where the cluster's controller is."""
    return subprocess.run(cluster.client_cmd([str(root.BIN / "tunefleet"), *args]), capture_output=True,
                          text=True, timeout=timeout, cwd=root.REPO, env={**cluster.env, **(env or {})})


def submit(cluster: SlurmCluster, *args: str, env: dict | None = None) -> str:
    result = cli(cluster, "submit", TINY, "--to", "slurm", *args, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    ref = result.stdout.strip().splitlines()[-1]
    assert ref.startswith("slurm:"), result.stdout
    return ref.removeprefix("slurm:")


def wait_for_state(cluster: SlurmCluster, job_id: str, states: set[str], timeout_s: float = 300,
                   until=None) -> dict[str, str]:
    """Poll `scontrol -o show job` until the job is in one of `states` (and `until(fields)` holds)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        fields = cluster.job_fields(job_id)
        if fields.get("JobState") in states and (until is None or until(fields)):
            return fields
        time.sleep(1)
    raise AssertionError(f"job {job_id} never reached {states}: {fields}\n{job_log(fields)[-4000:]}\n"
                         f"{cluster.diagnostics()}")


def job_log(fields: dict[str, str]) -> str:
    path = Path(fields.get("StdOut", "/nonexistent"))
    return path.read_text(errors="replace") if path.is_file() else f"(no log at {path})"


def train_steps(out: Path) -> list[int]:
    metrics = out / "metrics.jsonl"
    if not metrics.is_file():
        return []
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [row["step"] for row in rows if "loss" in row]


def wait_for_steps(out: Path, count: int, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while len(train_steps(out)) < count:
        assert time.time() < deadline, f"the run never logged {count} steps"
        time.sleep(0.3)


def job_processes(job_id: str) -> list[str]:
    """Command lines of live processes that belong to this job's Ray (its temp dir names the job)."""
    marker = f"/tmp/tf-ray-{job_id}-"
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if proc.name.isdigit() and marker in cmdline:
            found.append(cmdline)
    return found
