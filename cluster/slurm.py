"""Slurm backend: one sbatch job per run.

The job starts a Ray node on each of its nodes with `srun` (the head on the
first), runs `tunefleet launch` against that Ray cluster and stops Ray by the
PIDs it started. On USR1 (the time limit is near, or a manual
`scancel --signal=USR1 --batch`) the run checkpoints and exits 75, and the job
requeues itself; the next run resumes from that checkpoint.

Quoting: every value the renderer puts into the script body is shell-quoted by
default (a jinja `finalize` hook), so a template cannot forget. `#SBATCH` lines
are bash comments but sbatch parses them with rules of its own (double quotes,
backslash escapes, `#` ends the line, no newline possible): the `sbatch` filter
writes values for that parser and refuses what it cannot hold.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import jinja2

from tunefleet.cluster.backend import ClusterError, JobStatus

TEMPLATE = "sbatch.sh.j2"
SIGNAL_MARGIN_S = 30  # after the checkpoint: stop Ray and requeue before Slurm's SIGKILL
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                          "BOOT_FAIL", "DEADLINE", "PREEMPTED", "SPECIAL_EXIT"})
_JOB_ID = re.compile(r"^\d+(_\d+)?$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SBATCH_PLAIN = re.compile(r"^[\w.,:@%+=/-]+$")
_SCONTROL_FIELD = re.compile(r"([A-Za-z][\w:/]*)=(.*?)(?=\s[A-Za-z][\w:/]*=|$)")
_SACCT_FIELDS = ("JobID", "JobName", "State", "ExitCode", "NodeList")


# --------------------------------------------------------------------------- quoting
class _Code(str):
    """Text the template writes as is (shell code, or already quoted for sbatch)."""


def shell_value(value: Any) -> str:
    """jinja `finalize`: every `{{ value }}` is shell-quoted unless marked as code."""
    return str(value) if isinstance(value, _Code) else shlex.quote(str(value))


def sbatch_quote(value: Any, what: str = "value") -> _Code:
    """Quote a value for an `#SBATCH` line the way sbatch's directive parser reads it."""
    text = str(value)
    if _CONTROL.search(text):
        raise ClusterError(f"{what} {text!r} holds a newline or control character, which an #SBATCH line cannot")
    if _SBATCH_PLAIN.match(text):
        return _Code(text)
    return _Code('"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"')


def sbatch_option(option: str) -> _Code:
    """An extra `#SBATCH` option the user wrote in sbatch's own syntax."""
    if _CONTROL.search(option) or not option.startswith("-"):
        raise ClusterError(f"cluster.slurm.extra_sbatch: {option!r} must be one sbatch option, e.g. --qos=high")
    return _Code(option)


@cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("tunefleet.cluster", "templates"), finalize=shell_value, autoescape=False,
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
        comment_start_string="{##", comment_end_string="##}",  # bash's ${#array} holds "{#"
    )
    env.filters.update(sbatch=sbatch_quote, sbatch_option=sbatch_option, code=_Code)
    return env


# --------------------------------------------------------------------------- rendering
def render_sbatch(recipe: Any, recipe_path: str, overrides: Sequence[str], options: Any) -> str:
    """The batch script for `recipe` (a validated Recipe) with `options` (its effective SlurmConfig)."""
    return _environment().get_template(TEMPLATE).render(**_context(recipe, recipe_path, overrides, options))


def _context(recipe: Any, recipe_path: str, overrides: Sequence[str], options: Any) -> dict[str, Any]:
    par = recipe.parallelism
    cpus_per_node, gpus_per_node = _node_resources(par, options)
    names = list(options.export_env)
    export = ",".join((["ALL"] if options.export_all else []) + names) or "NONE"
    return {
        "job_name": recipe.name, "num_nodes": par.num_nodes, "cpus_per_node": cpus_per_node,
        "gpus_per_node": gpus_per_node, "log_pattern": log_pattern(recipe.output_dir), "workdir": os.getcwd(),
        "export": export, "requeue": options.requeue, "signal_grace_s": _signal_grace_s(recipe, options),
        "partition": options.partition, "time": options.time, "account": options.account,
        "extra_sbatch": list(options.extra_sbatch), "setup": list(options.setup),
        "recipe_path": str(Path(recipe_path).resolve()), "output_dir": recipe.output_dir,
        "bin_dir": _bin_dir(options), "join_timeout_s": options.join_timeout_s, "overrides": list(overrides),
    }


def _node_resources(par: Any, options: Any) -> tuple[int, int]:
    needed_cpus = par.workers_per_node * par.cpus_per_worker
    cpus = options.cpus_per_node or needed_cpus
    if cpus < needed_cpus:
        raise ClusterError(
            f"cluster.slurm.cpus_per_node ({cpus}) is below parallelism.workers_per_node x cpus_per_worker "
            f"({needed_cpus}); raise it or leave it unset"
        )
    gpus = options.gpus_per_node if options.gpus_per_node is not None else (
        par.workers_per_node if par.use_gpu else 0)
    if par.use_gpu and gpus < par.workers_per_node:
        raise ClusterError(
            f"cluster.slurm.gpus_per_node ({gpus}) is below parallelism.workers_per_node ({par.workers_per_node}) "
            "with parallelism.use_gpu; raise it or leave it unset"
        )
    return cpus, gpus


def _signal_grace_s(recipe: Any, options: Any) -> int:
    checkpoint_s = recipe.fault_tolerance.preemption_grace_s
    if options.signal_grace_s is None:
        return math.ceil(checkpoint_s) + SIGNAL_MARGIN_S
    if options.signal_grace_s < checkpoint_s:
        raise ClusterError(
            f"cluster.slurm.signal_grace_s ({options.signal_grace_s}) is shorter than "
            f"fault_tolerance.preemption_grace_s ({checkpoint_s:g}): Slurm would kill the job mid-checkpoint; "
            "raise it or leave it unset"
        )
    return options.signal_grace_s


def log_pattern(output_dir: str) -> str:
    """`--output` for the job, `%j` being the job id. A `%` or `\\` in the folder would be read as a
    pattern (or turn patterns off), and scontrol then reports a wrong path: refuse them."""
    odd = sorted({char for char in output_dir if char in "%\\"})
    if odd:
        raise ClusterError(f"output_dir {output_dir!r} holds {' and '.join(odd)}, which Slurm's --output reads "
                           "as a file name pattern; choose a folder without them")
    return output_dir + "/slurm-%j.out"


def _bin_dir(options: Any) -> str:
    if options.bin_dir:
        return options.bin_dir
    here = Path(sys.executable).parent
    if not (here / "tunefleet").exists() or not (here / "ray").exists():
        raise ClusterError(f"no `tunefleet` and `ray` next to {sys.executable}; set cluster.slurm.bin_dir to "
                           "the folder holding them on the compute nodes")
    return str(here)


# --------------------------------------------------------------------------- the backend (see backend.Backend)
name = "slurm"
render = render_sbatch


def submit(recipe: Any, recipe_path: str, overrides: Sequence[str], options: Any) -> str:
    """Write the script to `<output_dir>/.slurm/job.sbatch`, `sbatch` it, return the job id."""
    script = render_sbatch(recipe, recipe_path, overrides, options)
    job_dir = Path(recipe.output_dir) / ".slurm"
    job_dir.mkdir(parents=True, exist_ok=True)  # Slurm opens the --output file there
    path = job_dir / "job.sbatch"
    path.write_text(script)
    result = _run("sbatch", "--parsable", str(path))
    if result.returncode != 0:
        raise ClusterError(f"sbatch refused the job: {_last_line(result)}")
    return result.stdout.strip().split(";")[0]


def status(job_id: str) -> JobStatus:
    """What slurmctld knows (`scontrol -o show job`), else the accounting record (`sacct`)."""
    _check_id(job_id)
    fields = _scontrol_job(job_id)
    if fields is not None:
        state = fields.get("JobState", "UNKNOWN")
        return JobStatus(
            job_id=f"slurm:{job_id}", name=fields.get("JobName"), state=state,
            reason=_present(fields.get("Reason")), exit_code=fields.get("ExitCode"),
            nodes=_present(fields.get("NodeList")), restarts=int(fields.get("Restarts", "0") or 0),
            log_path=_present(fields.get("StdOut")), finished=state in FINAL_STATES,
        )
    row = _sacct_job(job_id)
    if row is None:
        raise ClusterError(f"slurm job {job_id} is unknown to this cluster (neither scontrol nor sacct has it)")
    state = row["State"].split()[0]
    return JobStatus(job_id=f"slurm:{job_id}", name=row["JobName"], state=state, exit_code=row["ExitCode"],
                     nodes=_present(row["NodeList"]), finished=True)


def logs(job_id: str, follow: bool, poll_s: float = 1.0) -> Iterator[str]:
    """The job's output file; with `follow`, keep reading until the job has finished (requeues included)."""
    current = status(job_id)
    if not current.log_path:
        raise ClusterError(f"slurm job {job_id} ({current.state}) has no known log file; slurmctld has "
                           f"forgotten it: look for slurm-{job_id}.out in the run's output_dir")
    path, offset = Path(current.log_path), 0
    if not follow and not path.exists():
        raise ClusterError(f"no log yet at {path}: job {job_id} is {current.state}")
    while True:
        chunk, offset = _read_from(path, offset)
        if chunk:
            yield chunk
        if not follow or current.finished:
            return
        time.sleep(poll_s)
        current = status(job_id)
        if current.finished:  # one last read after the end
            chunk, offset = _read_from(path, offset)
            if chunk:
                yield chunk
            return


def cancel(job_id: str) -> JobStatus:
    """`scancel` the job unless it already finished; return its status before."""
    current = status(job_id)
    if not current.finished:
        result = _run("scancel", job_id)
        if result.returncode != 0:
            raise ClusterError(f"scancel {job_id} failed: {_last_line(result)}")
    return current


# --------------------------------------------------------------------------- helpers
def _check_id(job_id: str) -> None:
    if not _JOB_ID.match(job_id):
        raise ClusterError(f"{job_id!r} is not a Slurm job id (a number such as 42, or 42_3 for an array task)")


def _run(*cmd: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError:
        raise ClusterError(f"`{cmd[0]}` not found: run this on a Slurm login node "
                           "(Debian/Ubuntu: apt install slurm-client)") from None
    except subprocess.TimeoutExpired:
        raise ClusterError(f"`{' '.join(cmd)}` did not answer within {timeout_s:.0f}s; is slurmctld up?") from None


def parse_scontrol(line: str) -> dict[str, str]:
    """`scontrol -o show job` prints `Key=value` pairs; values such as paths may hold spaces."""
    return {key: value for key, value in _SCONTROL_FIELD.findall(line.strip())}


def _scontrol_job(job_id: str) -> dict[str, str] | None:
    result = _run("scontrol", "-o", "show", "job", job_id)
    if result.returncode != 0:
        if "Invalid job id" in result.stderr:
            return None
        raise ClusterError(f"scontrol show job {job_id} failed ({_last_line(result)}); is this a login node "
                           "of the cluster (slurm.conf or SLURM_CONF)?")
    lines = result.stdout.strip().splitlines()
    return parse_scontrol(lines[0]) if lines else None


def _sacct_job(job_id: str) -> dict[str, str] | None:
    """The accounting database, else the job completion log (`sacct -c`, jobcomp/filetxt)."""
    for extra in ((), ("-c",)):
        result = _run("sacct", *extra, "-j", job_id, "-X", "-P", "-n", "-o", ",".join(_SACCT_FIELDS))
        for line in result.stdout.splitlines():
            values = line.split("|")
            if len(values) == len(_SACCT_FIELDS) and values[0] == job_id:
                return dict(zip(_SACCT_FIELDS, values, strict=True))
    return None


def _last_line(result: subprocess.CompletedProcess) -> str:
    lines = (result.stderr.strip() or result.stdout.strip()).splitlines()
    return lines[-1] if lines else f"exit code {result.returncode}"


def _present(value: str | None) -> str | None:
    return None if value in (None, "", "(null)", "None") else value


def _read_from(path: Path, offset: int) -> tuple[str, int]:
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except FileNotFoundError:
        return "", offset
    return data.decode(errors="replace"), offset + len(data)
