"""Resume a 2-worker checkpoint on 1 and on 3 workers: DCP reshards, the global
batch is kept by adjusting accumulation, and the losses continue as if nothing
had changed (same global batches; only float reduction order differs)."""

from __future__ import annotations

import shutil

import pytest

from tests.e2e.conftest import FULL, launch, read_metrics

pytestmark = pytest.mark.e2e

# Global batch 12 rows = micro 2 x accum 3 x 2 workers; splits over 1, 2 and 3 workers.
BATCH = ["--set=train.micro_batch_size=2", "--set=train.grad_accum_steps=3"]


@pytest.fixture(scope="module")
def two_worker_run(ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("elastic-base") / "run"
    launch(FULL, out, *BATCH, address=ray_cluster.address)
    return out


@pytest.mark.parametrize("workers", [1, 3])
def test_resume_at_another_world_size_continues_the_loss(two_worker_run, ray_cluster, tmp_path, workers):
    out = tmp_path / f"on{workers}"
    shutil.copytree(two_worker_run / "checkpoints" / "step_8", out / "checkpoints" / "step_8")
    result = launch(FULL, out, *BATCH, f"--set=parallelism.workers_per_node={workers}", address=ray_cluster.address)
    expected_accum = 12 // (2 * workers)
    assert f"accumulation set to {expected_accum}" in result.stdout.replace("\n", " ")
    resumed = {r["step"]: r["loss"] for r in read_metrics(out)[0]}
    reference = {r["step"]: r["loss"] for r in read_metrics(two_worker_run)[0]}
    assert sorted(resumed) == list(range(9, 25))
    for step, loss in resumed.items():
        assert loss == pytest.approx(reference[step], rel=1e-5), step
