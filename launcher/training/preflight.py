"""Preflight: before loading the model, every worker checks its environment and
rank 0 reports per node, so a broken node stops the job in seconds with its
name and the fix, instead of a collective timeout half an hour later.

Checks: package versions equal to the driver's; read/write access to the
checkpoint folder and that every rank sees every other rank's file (shared
storage across nodes); an all-reduce that completes, with measured bandwidth;
free host memory against the planner's estimate.
"""

from __future__ import annotations

import importlib.metadata
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
import torch.distributed as dist

from tunefleet.launcher import collectives
from tunefleet.launcher.training.secrets import is_secret

PACKAGES = ("tunefleet", "torch", "deepspeed", "transformers", "peft", "ray")
PROBE_BYTES = 8 << 20


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "missing"
    return versions


@dataclass
class RankReport:
    rank: int
    node: str
    versions: dict[str, str]
    host_free_bytes: int
    secrets: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _check_storage(folder: Path, token: str, rank: int, world_size: int) -> list[str]:
    probe_dir = folder / f".preflight-{token}"
    try:
        probe_dir.mkdir(parents=True, exist_ok=True)
        (probe_dir / f"rank_{rank}").write_text(socket.gethostname())
    except OSError as exc:
        return [f"cannot write to {folder} ({exc.strerror}); give every node read/write access"]
    collectives.barrier()
    missing = [r for r in range(world_size) if not (probe_dir / f"rank_{r}").is_file()]
    collectives.barrier()
    if rank == 0:
        for child in probe_dir.iterdir():
            child.unlink()
        probe_dir.rmdir()
    if missing:
        return [f"{folder} is not shared: files of ranks {missing} are not visible here; "
                "set checkpoint.dir to storage that every node mounts"]
    return []


def _all_reduce_bandwidth(device: torch.device) -> float:
    """Bus bandwidth in GB/s of an all-reduce of PROBE_BYTES (ring algorithm factor 2(n-1)/n)."""
    tensor = torch.ones(PROBE_BYTES // 4, dtype=torch.float32, device=device)
    collectives.all_reduce(tensor)  # warm-up, also proves the collective completes
    _synchronize(device)
    started = time.perf_counter()
    collectives.all_reduce(tensor)
    _synchronize(device)
    elapsed = time.perf_counter() - started
    world = dist.get_world_size()
    return PROBE_BYTES * 2 * (world - 1) / world / elapsed / 1e9 if world > 1 else float("inf")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # NCCL returns before the transfer is done


def run_preflight(*, driver_versions: dict[str, str], checkpoint_dir: str, host_bytes_needed: int,
                  device: torch.device, node: str | None = None) -> tuple[list[str], dict]:
    """Collective. Returns (problems naming nodes, report) identical on every rank."""
    rank, world = dist.get_rank(), dist.get_world_size()
    token = collectives.broadcast_object(uuid.uuid4().hex[:8] if rank == 0 else None)
    node = node or socket.gethostname()
    mine = RankReport(rank, node, package_versions(), psutil.virtual_memory().available,
                      secrets=sorted(name for name in os.environ if is_secret(name)))
    mine.problems += _check_storage(Path(checkpoint_dir), token, rank, world)
    for name, version in mine.versions.items():
        if version != driver_versions.get(name):
            mine.problems.append(f"{name} {version} differs from the driver's {driver_versions.get(name)}; "
                                 "install the same versions on every node")
    if host_bytes_needed and mine.host_free_bytes < host_bytes_needed:
        mine.problems.append(f"{mine.host_free_bytes / 2**30:.1f} GiB host memory free, the plan needs "
                             f"{host_bytes_needed / 2**30:.1f} GiB; see `tunefleet plan` or add nodes")
    bandwidth = _all_reduce_bandwidth(device)
    reports: list[RankReport] = collectives.all_gather_objects(mine)
    problems = [f"node {r.node} (rank {r.rank}): {p}" for r in reports for p in r.problems]
    report = {
        "all_reduce_gbps": round(bandwidth, 3),
        "nodes": sorted({r.node for r in reports}),
        "min_host_free_gib": round(min(r.host_free_bytes for r in reports) / 2**30, 1),
        "versions": reports[0].versions,
        # names only: which secrets (API keys, tokens) every worker has in its environment
        "secrets_on_every_worker": sorted(set.intersection(*(set(r.secrets) for r in reports))),
    }
    return problems, report
