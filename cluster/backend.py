"""What a cluster backend offers the CLI, and the registry `--to` picks from.

A backend turns one validated recipe into a job on a scheduler (render,
submit) and answers for that job afterwards (status, logs, cancel). Inside
every job the training command is `tunefleet launch` against a Ray cluster the
backend starts, so a recipe means the same thing everywhere.

`cluster/` knows nothing of models: backends read the recipe's layout and
their own settings section by attribute and never import the launcher.
Backends are imported on first use, so the Slurm path never loads the
Kubernetes client and the reverse.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

# name -> the module that implements `Backend`; a new backend adds one line here.
BACKENDS: dict[str, str] = {
    "slurm": "tunefleet.cluster.slurm",
    "kubernetes": "tunefleet.cluster.kubernetes",
}
DEFAULT_BACKEND = "slurm"  # what a bare job id (no `name:` prefix) refers to


class ClusterError(Exception):
    """A scheduler-side problem the user can fix; the message says how."""


@dataclass(frozen=True)
class JobStatus:
    """One job as the scheduler sees it, in words a user reads."""

    job_id: str  # with its backend prefix, e.g. "slurm:42"
    name: str | None
    state: str  # the scheduler's own word: PENDING, RUNNING, COMPLETED, ...
    reason: str | None = None  # why it waits or ended, when the scheduler says
    exit_code: str | None = None
    nodes: str | None = None
    restarts: int = 0
    log_path: str | None = None
    finished: bool = False

    def lines(self) -> list[str]:
        fields = [("job", self.job_id), ("name", self.name), ("state", self.state), ("reason", self.reason),
                  ("exit code", self.exit_code), ("nodes", self.nodes),
                  ("restarts", str(self.restarts) if self.restarts else None), ("log", self.log_path)]
        return [f"{key}: {value}" for key, value in fields if value]


class Backend(Protocol):
    """The surface `tunefleet submit/status/logs/cancel` uses, met by a backend *module*'s
    `name` and functions (no adapter class: each module is the backend)."""

    name: str

    def render(self, recipe: Any, recipe_path: str, overrides: Sequence[str], options: Any) -> str:
        """The job description (script or manifest) that `submit` would send, as text."""

    def submit(self, recipe: Any, recipe_path: str, overrides: Sequence[str], options: Any) -> str:
        """Send the job; return its scheduler id (without the backend prefix)."""

    def status(self, job_id: str) -> JobStatus: ...

    def logs(self, job_id: str, follow: bool) -> Iterator[str]:
        """Chunks of the job's log; with `follow`, keep going until the job has finished."""

    def cancel(self, job_id: str) -> JobStatus:
        """Stop the job; return its status just before."""


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ClusterError(f"unknown backend {name!r}; choose one of: {', '.join(sorted(BACKENDS))}")
    return importlib.import_module(BACKENDS[name])


def parse_job_ref(ref: str) -> tuple[str, str]:
    """`slurm:42` -> ("slurm", "42"); a bare `42` belongs to the default backend."""
    name, sep, job_id = ref.strip().partition(":")
    if not sep:
        name, job_id = DEFAULT_BACKEND, name
    if not job_id or name not in BACKENDS:
        known = ", ".join(f"{b}:<id>" for b in sorted(BACKENDS))
        raise ClusterError(f"job {ref!r} not understood; write {known} or a bare Slurm job number")
    return name, job_id
