"""Tokenize once on a real Ray cluster: one task before any worker, errors on the driver."""

from __future__ import annotations

import json

import pytest

from tunefleet.launcher.config import DataConfig, DataSource
from tunefleet.launcher.data import batches, preprocess
from tunefleet.launcher.errors import DataError
from tunefleet.launcher.model.tiny import ensure_tiny_model
from tunefleet.launcher.run import tokenize_task

pytestmark = pytest.mark.e2e


@pytest.fixture
def ray_driver(ray_cluster, monkeypatch):
    import ray

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray.init(address=ray_cluster.address, logging_level="ERROR")
    yield
    ray.shutdown()


def test_prepare_on_ray_tokenizes_in_a_task_once_and_raises_data_errors_here(ray_driver, tmp_path, monkeypatch):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"instruction": f"Add {i} and 1.", "output": str(i + 1)}) + "\n"
                            for i in range(50)))
    cfg = DataConfig(sources=[DataSource(path=str(rows))], cache_dir=str(tmp_path / "cache"), max_seq_len=64)
    model_dir = str(ensure_tiny_model("llama"))

    def on_the_driver(*args):
        raise AssertionError("tokenized in the driver process")

    monkeypatch.setattr(preprocess, "build_splits", on_the_driver)  # the Ray task's process is not patched
    folder = tokenize_task.prepare_on_ray(cfg, model_dir, seed=0)
    assert batches.cache_meta(folder)["train_rows"] == 50
    assert tokenize_task.prepare_on_ray(cfg, model_dir, seed=0) == folder  # cached: no second task

    rows.write_text('{"instruction": "Add 1 and 1.", "output": "2"}\n{"instruction": "Add 2 and 2."}\n')
    with pytest.raises(DataError, match=r"rows.jsonl:2: field `output` missing"):
        tokenize_task.prepare_on_ray(cfg, model_dir, seed=0)
