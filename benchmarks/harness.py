"""What the side-by-side benchmarks share: running a training command as a
subprocess with its CPU use sampled from /proc, per-step records, the
steady-state figures computed from them, and a description of the machine.

``ddp_vs_torchrun.py`` and ``peers.py`` build on it; every system they compare
is measured by the same code here, so a difference in a figure is a difference
in the system, not in how it was measured.
"""

from __future__ import annotations

import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BIN = Path(os.path.abspath(sys.executable)).parent  # normalised, not resolved: the venv's bin, not the base python's
RUN_TIMEOUT_S = 1200
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Scripts whose processes are training ranks; the launchers that start them are not.
RANK_SCRIPTS = (b"torchrun_ddp.py", b"trl_sft.py")
LAUNCHERS = (b"bin/torchrun", b"bin/accelerate")


QUIET_LOAD_PER_CORE = 0.5  # 1-minute load average per core above which timings are not worth taking


class MachineBusy(SystemExit):
    """The machine is busy: side-by-side timings would measure the other work (exits with the message)."""


def require_quiet(allow_busy: bool = False, per_core: float = QUIET_LOAD_PER_CORE) -> dict:
    """Refuse to benchmark on a busy machine (1-minute load average above ``per_core`` per core);
    with ``allow_busy`` go on, saying so loudly. Returns what was seen, for the result's record."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    seen = {"load_avg_1m": round(load, 2), "cores": cores, "quiet": load <= per_core * cores}
    if seen["quiet"]:
        return seen
    message = (f"the machine is busy: 1-minute load average {load:.2f} on {cores} cores (more than {per_core} per "
               "core); timings taken now measure the other work. Stop it and run again, or pass --allow-busy "
               "to record them marked as busy.")
    if not allow_busy:
        raise MachineBusy(message)
    print(f"WARNING: {message}", file=sys.stderr, flush=True)
    return seen


class RunFailed(SystemExit):
    """A benchmarked command exited non-zero (uncaught, it exits with the message and no traceback)."""


# --------------------------------------------------------------------------- CPU accounting
def process_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds user + system) of every live process (Linux /proc)."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path("/proc", name, "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # fields from the 3rd on: state, ppid, ...
        table[int(name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)
    return table


def descendants(table: dict[int, tuple[int, float]], root: int) -> set[int]:
    children = defaultdict(list)
    for pid, (parent, _) in table.items():
        children[parent].append(pid)
    found, todo = set(), [root] if root in table else []  # the root is gone once the run has exited
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(children[pid])
    return found


def process_role(pid: int) -> str:
    """Role of a process: "rank" (a Ray Train worker, a torchrun or accelerate child) or "other"."""
    try:
        cmdline = Path("/proc", str(pid), "cmdline").read_bytes()
    except OSError:
        return "other"
    is_script_rank = any(s in cmdline for s in RANK_SCRIPTS) and not any(s in cmdline for s in LAUNCHERS)
    return "rank" if b"RayTrainWorker" in cmdline or is_script_rank else "other"


class TreeCpu(threading.Thread):
    """Once a second, the CPU seconds of every process under ``root_pid``, with its role.

    torchrun starts ranks in sessions of their own and Ray reparents nothing, so
    the process tree (not the session) is what belongs to a run.
    """

    def __init__(self, root_pid: int, interval_s: float = 1.0):
        super().__init__(daemon=True)
        self.root_pid, self.interval_s = root_pid, interval_s
        self.samples: list[tuple[float, dict[int, tuple[str, float]]]] = []
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval_s):
            table = process_table()
            tree = descendants(table, self.root_pid)
            self.samples.append((time.time(), {pid: (process_role(pid), table[pid][1]) for pid in tree}))

    def stop(self) -> list[tuple[float, dict[int, tuple[str, float]]]]:
        self._done.set()
        self.join()
        return self.samples


def window_cpu(samples: list, start: float, end: float) -> tuple[float, float, dict[str, float]] | None:
    """(first, last sample time, CPU seconds by role between them) over samples inside [start, end]."""
    inside = [sample for sample in samples if start <= sample[0] <= end]
    if len(inside) < 2:
        return None
    (first_time, first), (last_time, last) = inside[0], inside[-1]
    used = {"rank": 0.0, "other": 0.0}
    for pid, (role, cpu_s) in last.items():
        used[role] += cpu_s - first.get(pid, (role, 0.0))[1]
    return first_time, last_time, used


# --------------------------------------------------------------------------- runs
@dataclass
class Run:
    kind: str  # the system, e.g. "tunefleet", "torchrun"
    pair: int
    started: float  # unix seconds just before the subprocess was spawned
    wall_s: float  # the whole subprocess
    steps: list[dict] = field(default_factory=list)  # step, loss, num_input_tokens, step_time_s, time
    cpu_samples: list = field(default_factory=list, repr=False)  # from TreeCpu

    def tokens_per_s(self, warmup: int) -> float:
        """Median over steady-state steps of tokens / (end of this step - end of the previous)."""
        pairs = zip(self.steps[warmup:-1], self.steps[warmup + 1:], strict=True)
        return statistics.median(b["num_input_tokens"] / (b["time"] - a["time"]) for a, b in pairs)

    def step_tokens_per_s(self, warmup: int) -> float | None:
        """Over the in-loop step timer only; None for a system that has no such timer (TRL)."""
        steps = self.steps[warmup + 1:]
        if any("step_time_s" not in s for s in steps):
            return None
        return statistics.median(s["num_input_tokens"] / s["step_time_s"] for s in steps)

    @property
    def first_step_s(self) -> float:
        return self.steps[0]["time"] - self.started

    def cpu_use(self, warmup: int) -> dict:
        """Steady-state CPU: tokens per rank CPU-second (blind to how busy the machine is) and cores used."""
        window = window_cpu(self.cpu_samples, self.steps[warmup]["time"], self.steps[-1]["time"])
        if window is None:
            return {"tokens_per_rank_cpu_s": None, "rank_cpu_cores": None, "other_cpu_cores": None}
        first_time, last_time, used = window
        times = [s["time"] for s in self.steps]
        seen = np.cumsum([s["num_input_tokens"] for s in self.steps])
        tokens = float(np.interp(last_time, times, seen) - np.interp(first_time, times, seen))
        span_s = last_time - first_time
        return {"tokens_per_rank_cpu_s": tokens / used["rank"], "rank_cpu_cores": used["rank"] / span_s,
                "other_cpu_cores": used["other"] / span_s}

    def summary(self, warmup: int) -> dict:
        return {"kind": self.kind, "pair": self.pair, "tokens_per_s": self.tokens_per_s(warmup),
                "step_tokens_per_s": self.step_tokens_per_s(warmup), "first_step_s": self.first_step_s,
                "wall_s": self.wall_s, **self.cpu_use(warmup),
                "loss_step_1": self.steps[0]["loss"], "loss_last": self.steps[-1]["loss"]}


def subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # embedded Ray, never a shared one
    env.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"})
    return env


def run_logged(command: list[str], log_path: Path) -> tuple[float, float, list]:
    """Run to completion with output in ``log_path``; (unix start, wall seconds, CPU samples).

    On a timeout or Ctrl-C it kills only the process group it started.
    """
    started = time.time()
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=subprocess_env(),
                                cwd=REPO, start_new_session=True)
        sampler = TreeCpu(proc.pid)
        sampler.start()
        try:
            code = proc.wait(timeout=RUN_TIMEOUT_S)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        finally:
            samples = sampler.stop()
    if code != 0:
        raise RunFailed(f"{Path(command[0]).name} exited {code}; see {log_path}")
    return started, time.time() - started, samples


def alternating(rounds: int, sides: tuple[str, ...]) -> Iterator[tuple[int, str]]:
    """(round, side) of every run: each round runs every side, every other round in reverse order, so that drift
    in the machine's speed falls on all sides alike."""
    for round_ in range(rounds):
        for side in sides if round_ % 2 == 0 else sides[::-1]:
            yield round_, side


def median(values: list) -> float | None:
    """Median of the values that are not None; None if there are none."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def cell(fmt: str, value: float | None) -> str:
    return "n/a" if value is None else fmt.format(value)


def machine() -> dict:
    """CPU model, cores, RAM, kernel, Python and the load average now."""
    cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor())
    mem_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))
    return {"date": datetime.now(UTC).isoformat(timespec="seconds"), "cpu_model": cpu_model,
            "cpu_count": os.cpu_count(), "ram_gib": round(mem_kib / 2**20, 1), "platform": platform.platform(),
            "python": platform.python_version(), "load_avg": [round(x, 2) for x in os.getloadavg()]}


def versions(*names: str) -> dict[str, str | None]:
    """Installed versions of these distributions (None when missing)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found
