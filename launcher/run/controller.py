"""What tunefleet adds to Ray Train's controller (an actor of its own): a report of each worker
failure, sent to the launch's console before the worker group restarts."""

from __future__ import annotations

import time

import ray
from ray.train import UserCallback

from tunefleet.launcher.training import failures

# A node that dies takes its workers with it, often before the cluster has noticed the node is gone (Ray's
# health checks take seconds); a worker that died without a trace is reported as lost with its node if the
# cluster marks the node dead within this wait.
NODE_LOSS_WAIT_S = 5.0


def node_lost(node_id: str, wait_s: float = NODE_LOSS_WAIT_S) -> bool:
    deadline = time.monotonic() + wait_s
    while True:
        if not any(node["NodeID"] == node_id and node["Alive"] for node in ray.nodes()):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.25)


class FailureReporter(UserCallback):
    """Names each failed rank's cause (see failures.py) and sends the console one event."""

    def __init__(self, hub, output_dir: str):
        self.hub, self.output_dir = hub, output_dir

    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        found = [failures.describe(rank, error, self.output_dir, node_lost=node_lost)
                 for rank, error in sorted(worker_exceptions.items())]
        self.hub.put.remote({"event": "worker_failed", "line": failures.summary(found),
                             "ranks": [vars(f) for f in found]})
