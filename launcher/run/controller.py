"""What tunefleet adds to Ray Train's controller (an actor of its own): a report of each worker
failure, sent to the launch's console before the worker group restarts."""

from __future__ import annotations

import socket
import time

import ray
from ray.train import UserCallback

from tunefleet.launcher.training import failures

# A node that dies takes its workers with it, often before the cluster has noticed the node is gone (Ray's
# health checks take 15 s and more by default). A node counts as lost once the cluster marks it dead or its
# raylet stops taking connections; a worker that died without a trace is reported as lost with its node if
# either happens within this wait.
NODE_LOSS_WAIT_S = 5.0
RAYLET_PROBE_TIMEOUT_S = 1.0


def lost_nodes(node_ids: set[str], wait_s: float = NODE_LOSS_WAIT_S) -> set[str]:
    """Which of these nodes are gone, waiting up to ``wait_s`` for any to be seen gone."""
    deadline = time.monotonic() + wait_s
    while True:
        alive = {node["NodeID"]: node for node in ray.nodes() if node["Alive"]}
        lost = {node for node in node_ids if node not in alive or not _raylet_answers(alive[node])}
        if lost or time.monotonic() >= deadline:
            return lost
        time.sleep(0.25)


def _raylet_answers(node: dict) -> bool:
    try:
        socket.create_connection((node["NodeManagerAddress"], node["NodeManagerPort"]),
                                 timeout=RAYLET_PROBE_TIMEOUT_S).close()
    except OSError:
        return False
    return True


class FailureReporter(UserCallback):
    """Names each failed rank's cause (see failures.py) and sends the console one event."""

    def __init__(self, hub, output_dir: str):
        self.hub, self.output_dir = hub, output_dir

    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        found = failures.describe_all(worker_exceptions, self.output_dir, lost_nodes=lost_nodes)
        self.hub.put.remote({"event": "worker_failed", "line": failures.summary(found),
                             "ranks": [vars(f) for f in found]})
