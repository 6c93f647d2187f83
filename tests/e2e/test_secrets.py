"""Secrets in the driver's environment reach the workers and no file, log or console line: not the Ray
session's folder (its runtime-env log records every runtime env), not the run folder (W&B's offline
files included), not the console."""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from tests.e2e.conftest import FULL, launch

pytestmark = pytest.mark.e2e

QUICK = ["--set=train.max_steps=4", "--set=train.warmup_steps=0", "--set=train.eval_every_steps=2",
         "--set=checkpoint.every_steps=2", "--set=logging.wandb.mode=offline"]


def planted() -> dict[str, str]:
    token = uuid.uuid4().hex
    return {"WANDB_API_KEY": f"wandbsecret{token}", "HF_TOKEN": f"hfsecret{token}",
            "HUGGING_FACE_HUB_TOKEN": f"hubsecret{token}", "TUNEFLEET_DB_PASSWORD": f"dbsecret{token}"}


def files_holding(roots: list[Path], values: list[str]) -> list[str]:
    found = []
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                try:
                    content = path.read_bytes()
                except OSError:
                    continue
                found += [f"{path}: {value[:12]}..." for value in values if value.encode() in content]
    return found


def test_embedded_launch_keeps_secrets_off_disk_and_gives_them_to_workers(tmp_path):
    secrets = planted()
    ray_tmp = Path(tempfile.mkdtemp(prefix="tfr", dir="/tmp"))  # short: Ray's socket paths have a length limit
    try:
        # With the dashboard on, so that its logs are searched for the secrets too.
        result = launch(FULL, tmp_path / "run", *QUICK, "--set=cluster.dashboard=true",
                        env={**secrets, "RAY_TMPDIR": str(ray_tmp)})
        assert list(ray_tmp.rglob("runtime_env_agent.log")), "the Ray session did not use RAY_TMPDIR"
        assert list(ray_tmp.rglob("dashboard.log")), "cluster.dashboard: true started no dashboard"
        url = json.loads((tmp_path / "run" / "run.json").read_text())["ray_dashboard"]
        assert url.startswith("http://") and f"Ray dashboard: {url}" in result.stdout
        leaks = files_holding([ray_tmp, tmp_path / "run"], list(secrets.values()))
        leaks += [f"console: {name}" for name, value in secrets.items() if value in result.stdout + result.stderr]
        assert not leaks
        report = json.loads((tmp_path / "run" / "preflight.json").read_text())
        assert set(secrets) <= set(report["secrets_on_every_worker"])
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_workers_of_an_existing_cluster_get_secrets_from_the_driver(ray_cluster, tmp_path):
    """The cluster was started without them, so the workers can only have them from the driver."""
    secrets = planted()
    result = launch(FULL, tmp_path / "run", *QUICK, address=ray_cluster.address, env=secrets)
    report = json.loads((tmp_path / "run" / "preflight.json").read_text())
    assert set(secrets) <= set(report["secrets_on_every_worker"])
    leaks = files_holding([Path(ray_cluster.temp_dir), tmp_path / "run"], list(secrets.values()))
    leaks += [f"console: {name}" for name, value in secrets.items() if value in result.stdout + result.stderr]
    assert not leaks
