"""Shared fixtures: one real Ray cluster per session for end-to-end tests,
environment that keeps tests offline and hermetic, and a CLI runner."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

os.environ.setdefault("TUNEFLEET_CACHE", str(REPO / ".cache" / "tunefleet"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
if not shutil.which("nvidia-smi"):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed otherwise warns on every import
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_SILENT"] = "true"
os.environ.pop("WANDB_API_KEY", None)
os.environ.pop("RAY_ADDRESS", None)
# Ray Train's controller polls its workers every 2 s by default; it learns that a run ended or a worker
# died on its next poll. At 0.5 s a launch on the session cluster ends ~2 s sooner (28.9 -> 26.9 s, 3 alternating
# pairs), over ~55 launches and every restart of the suite. Clusters started here and embedded Rays inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tunefleet(*args: str, env: dict | None = None, timeout: float = 600, cwd: Path | None = None):
    """Run the real `tunefleet` console script; returns the CompletedProcess."""
    return subprocess.run(
        [str(BIN / "tunefleet"), *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})}, cwd=cwd or REPO,
    )


# Declare a dead node dead within a few seconds instead of ~30 s.
FAST_HEALTH_CHECKS = {
    "RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3",
}


class RayCluster:
    """`ray start --block` process groups on this machine (a head, optionally more
    nodes); stopped by PID, never with `ray stop`."""

    def __init__(self, num_cpus: int = 4, env: dict | None = None):
        self.temp_dir = tempfile.mkdtemp(prefix="tf-ray-", dir="/tmp")
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        # RAY_ADDRESS: Ray Train's placement-group cleaner auto-detects "the" cluster and
        # fails when several run on this machine (other tests, other sessions).
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": self.address, **(env or {})}
        self.proc = self._start("--head", f"--port={self.port}", f"--num-cpus={num_cpus}",
                                f"--temp-dir={self.temp_dir}", f"--dashboard-port={free_port()}")
        self.nodes: list[subprocess.Popen] = []
        self._wait_ready()

    def _start(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats", *args],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )

    def add_node(self, num_cpus: int = 1) -> subprocess.Popen:
        temp_dir = tempfile.mkdtemp(prefix="tf-rayn-", dir="/tmp")
        node = self._start(f"--address={self.address}", f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}")
        self.nodes.append(node)
        return node

    def alive_nodes(self) -> int:
        """Alive nodes as Ray's GCS sees them (-1 when the probe fails). Ray prints warnings about
        dead raylets to stdout too, so the count comes on a line of its own."""
        probe = subprocess.run(
            [str(BIN / "python"), "-c",
             f"import ray; ray.init(address='{self.address}', logging_level='ERROR');"
             "print('ALIVE_NODES', sum(n['Alive'] for n in ray.nodes()))"],
            capture_output=True, text=True, env=self.env,
        )
        counts = [line.split()[1] for line in probe.stdout.splitlines() if line.startswith("ALIVE_NODES ")]
        return int(counts[-1]) if counts else -1

    def wait_for_nodes(self, count: int, timeout_s: float = 90) -> None:
        deadline = time.time() + timeout_s
        while self.alive_nodes() != count:
            if time.time() > deadline:
                raise TimeoutError(f"cluster did not reach {count} alive nodes")
            time.sleep(1)

    @staticmethod
    def kill(proc: subprocess.Popen) -> None:
        """SIGKILL every process of a node's session (raylet, agents, workers): a machine dying.

        Ray workers move to process groups of their own, so killing the group would
        leave them training on; they all stay in the session `ray start` began."""
        if proc.poll() is None:
            for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    if os.getsid(pid) == proc.pid:
                        os.kill(pid, signal.SIGKILL)
            proc.wait(timeout=30)

    def _wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("ray start exited early")
            probe = subprocess.run([str(BIN / "ray"), "status", f"--address={self.address}"],
                                   capture_output=True, env=self.env)
            if probe.returncode == 0:
                return
            time.sleep(1)
        raise TimeoutError("Ray head did not come up")

    def stop(self) -> None:
        """End every node: SIGTERM first, then SIGKILL of whatever of its session is left. A head
        given SIGTERM alone takes ~30 s to wind down (it waits on processes it stops one by one);
        a test cluster's state is thrown away with its temp dir, so nothing is lost by not waiting."""
        for proc in [*self.nodes, self.proc]:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in [*self.nodes, self.proc]:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=2)
            self.kill(proc)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster():
    cluster = RayCluster()
    yield cluster
    cluster.stop()
