"""Run a function on N ranks of a fresh process group and collect what each rank returns.

Each rank is a spawned process with ``OMP_NUM_THREADS=1``, its own rank
environment and a process group on a free local port; the group is destroyed
when the function returns. Results come back to the parent through
``torch.save`` files in ``workdir``; a failing rank's traceback is re-raised in
the parent, and a run that exceeds ``timeout_s`` has its processes killed.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

REPO_ROOT = Path(__file__).resolve().parents[2]
# DeepSpeed JIT-builds its ops on first use; keep them in the git-ignored cache.
TORCH_EXTENSIONS_DIR = REPO_ROOT / ".cache" / "torch_extensions"
_POLL_S = 0.1
_GRACE_S = 10.0  # how long the other ranks may take to notice that one rank died
_LOG_TAIL_LINES = 30


class RankFailed(RuntimeError):
    """One or more ranks raised, crashed or timed out."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(
    fn: Callable[..., Any],
    *args: Any,
    workdir: Path,
    world_size: int = 2,
    backend: str = "gloo",
    timeout_s: float = 300.0,
) -> list[Any]:
    """Call ``fn(*args)`` on every rank; return the per-rank results in rank order.

    ``fn`` must be importable by name (a module-level function) and its result
    loadable with ``torch.load``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    for stale in [*workdir.glob("rank*.pt"), *workdir.glob("rank*.err"), *workdir.glob("rank*.log")]:
        stale.unlink()
    env = {
        "OMP_NUM_THREADS": "1",
        "TORCH_EXTENSIONS_DIR": str(TORCH_EXTENSIONS_DIR),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
    }
    context = multiprocessing.get_context("spawn")
    processes = []
    for rank in range(world_size):
        # Set before the child starts so it applies before torch is imported there.
        with _environment({**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}):
            process = context.Process(target=_entry, args=(rank, backend, timeout_s, workdir, fn, args))
            process.start()
        processes.append(process)
    _wait(processes, timeout_s)
    _raise_failures(processes, workdir, timeout_s)
    return [torch.load(workdir / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _entry(rank: int, backend: str, timeout_s: float, workdir: Path, fn: Callable, args: tuple) -> None:
    # Library chatter goes to a per-rank log (quoted in the parent's error), not the test output.
    log_fd = os.open(workdir / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    torch.set_num_threads(1)
    world_size = int(os.environ["WORLD_SIZE"])
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
    try:
        result = fn(*args)
    except BaseException:
        (workdir / f"rank{rank}.err").write_text(traceback.format_exc())
        raise SystemExit(1) from None
    finally:
        dist.destroy_process_group()
    torch.save(result, workdir / f"rank{rank}.pt")


def _wait(processes: list, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while any(p.is_alive() for p in processes):
        now = time.monotonic()
        if any(p.exitcode not in (None, 0) for p in processes):
            deadline = min(deadline, now + _GRACE_S)
        if now > deadline:
            for process in processes:
                if process.is_alive():
                    process.kill()
            for process in processes:
                process.join()
            return
        time.sleep(_POLL_S)
    for process in processes:
        process.join()


def _raise_failures(processes: list, workdir: Path, timeout_s: float) -> None:
    problems = []
    for rank, process in enumerate(processes):
        error_file = workdir / f"rank{rank}.err"
        if error_file.exists():
            problems.append(f"rank {rank} raised:\n{error_file.read_text()}")
        elif process.exitcode != 0:
            log = workdir / f"rank{rank}.log"
            log_tail = "".join(log.read_text().splitlines(True)[-_LOG_TAIL_LINES:]) if log.exists() else ""
            problems.append(
                f"rank {rank} exited with code {process.exitcode} (-9: killed by the harness after the "
                f"{timeout_s:.0f} s timeout or another rank's failure); "
                f"end of its log:\n{log_tail}"
            )
    if problems:
        raise RankFailed("\n".join(problems))
