"""How a worker died, in one line: which rank, on which node, and how (a Python error, a fatal
signal, SIGTERM, an out-of-memory kill, a lost node, or a kill that left no trace).

Ray reports every process death the same way ("connection error code 2"), so each rank leaves
its own evidence when it starts (``watch``): who it is (pid, host, node), the kernel OOM-kill
count of its memory cgroup, and files that ``faulthandler`` fills if the process gets a fatal
signal (SIGSEGV, SIGBUS, SIGFPE, SIGABRT, SIGILL) or a SIGTERM/SIGHUP. After a failure the Ray
Train controller hands tunefleet the exception of each failed rank; ``describe`` reads that
exception with the rank's evidence and names the cause.

A rank that dies leaves its peers' collectives broken ("Connection closed by peer"), and a peer
often reports that before Ray has noticed the death: ``describe_all`` then looks for the rank of
the same attempt that is gone, so the cause is named rather than its echo.
"""

from __future__ import annotations

import faulthandler
import json
import os
import re
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

WORKERS_DIR = ".workers"  # under the run folder; one set of files per rank, rewritten by each attempt
FATAL_SIGNALS = {"SIGSEGV": "segmentation fault", "SIGBUS": "bus error", "SIGFPE": "floating-point exception",
                 "SIGABRT": "abort", "SIGILL": "illegal instruction"}
REPORTED_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # reported, then handled as before (chain)
CGROUP_OOM_FILES = (Path("/sys/fs/cgroup/memory.events"), Path("/sys/fs/cgroup/memory/memory.oom_control"))
# What a collective raises when the rank at the other end is gone (gloo, NCCL, the TCP store)
PEER_GONE = re.compile(r"connection (closed|reset) by peer|remote process exited|communicator was aborted|"
                       r"broken pipe|ncclRemoteError", re.IGNORECASE)
ACTOR_DIED = "The actor died"  # how Ray begins the report of a worker whose process is gone

_open_files: list = []  # faulthandler writes to these file objects; they must outlive the attempt


def kernel_oom_kills(files: tuple[Path, ...] = CGROUP_OOM_FILES) -> int | None:
    """The kernel OOM killer's kill count in this process's memory cgroup (v2 or v1), None if unreadable."""
    for path in files:
        try:
            match = re.search(r"^oom_kill (\d+)$", path.read_text(), re.MULTILINE)
        except OSError:
            continue
        if match:
            return int(match.group(1))
    return None


def watch(output_dir: str, rank: int, node_ip: str, node_id: str) -> Path:
    """Worker, at the start of an attempt: record who this rank is and arm the signal reports. Reports are
    named by process, so a restart keeps the last attempt's (empty ones are removed)."""
    folder = Path(output_dir) / WORKERS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(f"rank{rank}-*"):
        if old.stat().st_size == 0:
            old.unlink(missing_ok=True)
    for handle in _open_files:
        handle.close()
    _open_files.clear()
    pid = os.getpid()
    crash = (folder / f"rank{rank}-{pid}.crash").open("w")
    faulthandler.enable(file=crash, all_threads=True)
    _open_files.append(crash)
    for signum in REPORTED_SIGNALS:
        report = (folder / f"rank{rank}-{pid}.{signal.Signals(signum).name}").open("w")
        faulthandler.register(signum, file=report, all_threads=False, chain=True)
        _open_files.append(report)
    # Ray Train picks a fresh rendezvous (MASTER_ADDR:MASTER_PORT) for each attempt: it tells this
    # attempt's ranks from files an earlier, larger attempt left behind
    port = os.environ.get("MASTER_PORT")
    rendezvous = f"{os.environ.get('MASTER_ADDR', '')}:{port}" if port else None
    identity = {"rank": rank, "pid": pid, "host": socket.gethostname(), "node_ip": node_ip,
                "node_id": node_id, "oom_kills": kernel_oom_kills(), "rendezvous": rendezvous}
    (folder / f"rank{rank}.json").write_text(json.dumps(identity))
    return folder


@dataclass(frozen=True)
class Failure:
    rank: int
    where: str  # "node 10.0.0.3 (pid 4242)"
    how: str  # "was killed by the kernel OOM killer"
    died: bool  # the process (or its node) is gone; False: it raised a Python error
    evidence: str | None = None  # a file with more (a fatal signal's traceback)

    def line(self) -> str:
        more = f" (traceback: {self.evidence})" if self.evidence else ""
        return f"rank {self.rank} on {self.where} {self.how}{more}"


def describe(rank: int, error: BaseException | str, output_dir: str, *,
             lost_nodes: Callable[[set[str]], set[str]] | None = None,
             oom_files: tuple[Path, ...] = CGROUP_OOM_FILES) -> Failure:
    """One rank's failure, from Ray's exception for it and the files the rank left in ``watch``.
    ``lost_nodes(node_ids)``: which of those nodes the cluster lost (asked only for a death without a trace)."""
    folder = Path(output_dir) / WORKERS_DIR
    report = str(error)
    identity = _read_json(folder / f"rank{rank}.json")
    where = _where(identity, report)
    cause = getattr(error, "health_check_failure", None)  # Ray Train: the worker's actor is gone
    if cause is None and ACTOR_DIED not in report and "health check" not in report.lower():
        return Failure(rank, where, _raised(error), died=False)
    if re.search(r"node (has )?died|node .* (was )?(lost|removed)|NodeDiedError", report, re.IGNORECASE):
        return Failure(rank, where, "was lost with its node", died=True)
    if "OutOfMemoryError" in report or "memory monitor" in report or "low on memory" in report:
        return Failure(rank, where, "was killed by Ray's memory monitor: the node ran out of memory", died=True)
    reports = f"rank{rank}-{identity.get('pid')}"  # this process's own, never an earlier attempt's
    crash = _text(folder / f"{reports}.crash")
    if crash:
        return Failure(rank, where, f"crashed: {_fatal_signal(crash)}", died=True,
                       evidence=str(folder / f"{reports}.crash"))
    for signum in REPORTED_SIGNALS:
        name = signal.Signals(signum).name
        if _text(folder / f"{reports}.{name}"):
            return Failure(rank, where, f"received {name} (sent by someone outside tunefleet) and exited",
                           died=True)
    before, now = identity.get("oom_kills"), None
    if identity.get("host") == socket.gethostname():
        now = kernel_oom_kills(oom_files)
    if before is not None and now is not None and now > before:
        return Failure(rank, where, "was killed by the kernel OOM killer: the host ran out of memory", died=True)
    node = identity.get("node_id")
    if lost_nodes is not None and node and node in lost_nodes({node}):
        return Failure(rank, where, "was lost with its node", died=True)
    return Failure(rank, where, "was killed without a Python error or a signal it could report: SIGKILL "
                   "(kill -9, a scheduler) or os._exit", died=True)


def describe_all(errors: dict[int, BaseException | str], output_dir: str, *,
                 lost_nodes: Callable[[set[str]], set[str]] | None = None,
                 oom_files: tuple[Path, ...] = CGROUP_OOM_FILES) -> list[Failure]:
    """Every failed rank's failure, by rank. If every rank that failed only lost a peer, the ranks of the
    same attempt that did not fail (yet) are looked at: one whose process (on this host) or node is gone
    is the cause, which Ray reports seconds later if at all. Each node is waited on once (``lost_nodes``
    may wait seconds for a node that lives: several ranks killed on it would each have waited)."""
    lost_nodes = _asked_once(lost_nodes) if lost_nodes is not None else None
    found = [describe(rank, error, output_dir, lost_nodes=lost_nodes, oom_files=oom_files)
             for rank, error in sorted(errors.items())]
    if any(f.died for f in found) or not all(PEER_GONE.search(str(error)) for error in errors.values()):
        return found
    peers = _silent_peers(Path(output_dir) / WORKERS_DIR, set(errors))
    gone = [describe(peer["rank"], ACTOR_DIED, output_dir, lost_nodes=lost_nodes, oom_files=oom_files)
            for peer in peers if peer.get("host") == socket.gethostname() and not _alive(peer.get("pid"))]
    rest = [peer for peer in peers if peer["rank"] not in {f.rank for f in gone} and peer.get("node_id")]
    lost = lost_nodes({peer["node_id"] for peer in rest}) if lost_nodes and rest else set()
    gone += [Failure(peer["rank"], _where(peer, ""), "was lost with its node", died=True)
             for peer in rest if peer["node_id"] in lost]
    return sorted(found + gone, key=lambda failure: failure.rank)


def summary(failures: list[Failure]) -> str:
    """One line for one worker-group failure: the ranks that died (or raised first), then the rest."""
    died = [f for f in failures if f.died]
    first = died or failures[:1]
    rest = sorted(f.rank for f in failures if f not in first)
    tail = f"; rank{'s' if len(rest) > 1 else ''} {', '.join(map(str, rest))} stopped with it" if rest else ""
    return "; ".join(f.line() for f in first) + tail


def _asked_once(lost_nodes: Callable[[set[str]], set[str]]) -> Callable[[set[str]], set[str]]:
    """``lost_nodes`` that remembers its answers: a node seen lost, or waited on in full and found alive,
    is not asked about again."""
    known: dict[str, bool] = {}

    def ask(node_ids: set[str]) -> set[str]:
        if unknown := node_ids - known.keys():
            lost = lost_nodes(unknown)
            known.update(dict.fromkeys(lost, True) if lost else dict.fromkeys(unknown, False))
        return {node for node in node_ids if known.get(node)}

    return ask


def _silent_peers(folder: Path, failed: set[int]) -> list[dict]:
    """The identities of the ranks of the failed ranks' attempt (same rendezvous) that did not fail."""
    attempts = {_read_json(folder / f"rank{rank}.json").get("rendezvous") for rank in failed} - {None}
    peers = [_read_json(path) for path in sorted(folder.glob("rank*.json"))]
    return [identity for identity in peers
            if identity.get("rendezvous") in attempts and identity.get("rank") not in failed]


def _where(identity: dict, report: str) -> str:
    """"node 10.0.0.3 (id 1a2b3c4d, pid 4242)", from the rank's identity or Ray's report of it."""
    pid = identity.get("pid") or _field(report, "pid")
    ip = identity.get("node_ip") or _field(report, "ip") or "an unknown node"
    details = [f"id {identity['node_id'][:8]}"] if identity.get("node_id") else []
    return f"node {ip}" + (f" ({', '.join([*details, f'pid {pid}'])})" if pid else "")


def _alive(pid: int | None) -> bool:
    if not pid:
        return True  # unknown: no claim
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _raised(error: BaseException | str) -> str:
    """"raised ValueError: ...": the last exception line of a traceback report, or the exception itself."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    raised = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt|Exit|Fault)\b.*:", line)]
    if raised:
        line = raised[-1]
    elif isinstance(error, BaseException):
        line = f"{type(error).__name__}: {lines[-1] if lines else ''}".rstrip(": ")
    else:
        line = lines[-1] if lines else "an unknown error"
    exit_code = re.match(r"^SystemExit: (-?\d+)$", line)
    return f"exited with code {exit_code.group(1)}" if exit_code else f"raised {line}"


def _fatal_signal(crash: str) -> str:
    first = next((line for line in crash.splitlines() if line.startswith("Fatal Python error")), "")
    for name, words in FATAL_SIGNALS.items():
        if words in first.lower() or name in first:
            return f"{name} ({words})"
    return first or "a fatal signal"


def _field(report: str, name: str) -> str | None:
    match = re.search(rf"^\s*{name}: (\S+)$", report, re.MULTILINE)
    return match.group(1) if match else None


def _text(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return ""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
