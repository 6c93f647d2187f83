"""The floor of `ray_train_floor.py`, run as its own process: import Ray, start a local Ray as tunefleet's
embedded one (the parent sets the same environment), import Ray Train, and run a TorchTrainer of 2 gloo workers
whose function only notes when it started. Writes the wall clock of each phase's end to the JSON file given.
Imports nothing but Ray, so that nothing else is timed.

    python benchmarks/ray_train_floor_child.py marks.json
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def note_start(config: dict) -> None:
    import torch.distributed as dist

    if dist.get_rank() == 0:
        Path(config["path"]).write_text(str(time.time()))


def main(marks: Path) -> None:
    started = time.time()
    import ray

    imported = time.time()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
    ray_up = time.time()
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    train_imported = time.time()
    fn_marks = marks.with_suffix(".fn")
    TorchTrainer(note_start, train_loop_config={"path": str(fn_marks)}, torch_config=TorchConfig(backend="gloo"),
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(storage_path=str(marks.parent / "ray"))).fit()
    ray.shutdown()
    marks.write_text(json.dumps({"started": started, "ray_imported": imported, "ray_up": ray_up,
                                 "train_imported": train_imported, "fn_started": float(fn_marks.read_text())}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
