"""The embedded Ray's end (session.shutdown): no worker process of it outlives the launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import psutil
import pytest

pytestmark = pytest.mark.e2e

# A fresh embedded Ray in its own process (never the test session's cluster). The actor's exit never completes,
# as when Ray's own exit handler deadlocks (seen in Ray Train's controller): Ray ends an actor whose handles are
# all gone, and its exit runs the handler below.
SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    import ray
    from tunefleet.launcher.run import session

    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")

    @ray.remote(num_cpus=0)
    class Stuck:
        def __init__(self):
            import atexit
            atexit.register(time.sleep, 3600)

        def pid(self):
            return os.getpid()

    stuck = Stuck.remote()
    pid = ray.get(stuck.pid.remote())
    del stuck
    time.sleep(3)
    killed = session.shutdown(embedded=sys.argv[1] == "embedded", grace_s=3)
    print(json.dumps({"pid": pid, "killed": killed}))
""")


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("kind", ["embedded", "joined"])
def test_workers_that_outlive_the_embedded_ray_are_ended(tmp_path, kind):
    script = tmp_path / "stuck.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, str(script), kind], capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    try:
        if kind == "embedded":
            assert result["killed"] == [result["pid"]] and gone(result["pid"])
        else:  # a joined cluster's workers are not the launch's to end: what Ray leaves is left
            assert result["killed"] == [] and not gone(result["pid"])
    finally:
        if not gone(result["pid"]):
            psutil.Process(result["pid"]).kill()
