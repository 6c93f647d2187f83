"""Model FLOPs utilisation and memory per rank.

FLOPs per trained token follow the PaLM paper's accounting (appendix B): 6N for
the dense matmuls of forward and backward, plus 12·L·H·Q·T for attention
scores. With adapters, frozen weights get no weight gradient, so the dense part
is 4N + 2N_trainable. MFU divides the FLOPs of a step by its time and by the
peak of the ranks' devices. The peak must not move between runs: on GPU it is
the datasheet's dense bf16 figure; on CPU a matmul probe in the training dtype,
measured once per machine at a quiet moment and cached, since a probe on a busy
machine reads low (and MFU high). The run folder's ``mfu.json`` names the peak.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import resource
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import torch

from tunefleet.launcher.model.tiny import default_cache_dir

# Dense peak FLOP/s per GPU (datasheets; bf16 tensor core, no sparsity).
GPU_PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 125e12,
    "V100": 125e12, "T4": 65e12, "MI300X": 1307e12,
}
COMPUTE_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # parallelism.mixed_precision
# The CPU probe: the best of every size and repeat (a descheduled matmul only ever reads slower).
PEAK_PROBE_SIZES = (512, 1024, 2048)
PEAK_PROBE_REPEATS = 10
QUIET_WAIT_S = 3.0  # how long the first measurement on a machine waits for a quiet moment (start-up cost)
QUIET_SLACK_CORES = 0.25  # other work a "quiet" machine may run beside the probe's threads
MFU_FILE = "mfu.json"


@dataclass(frozen=True)
class PeakFlops:
    """The peak FLOP/s of one rank's device, and how it was obtained."""

    flops: float
    source: str  # "table: NVIDIA H100 ..." or "measured once on this machine (cached at ...)"


def flops_per_token(config, num_params: int, num_trainable: int, seq_len: int) -> float:
    layers = getattr(config, "num_hidden_layers", 0)
    heads = getattr(config, "num_attention_heads", 0)
    head_dim = getattr(config, "head_dim", None) or getattr(config, "hidden_size", 0) // max(heads, 1)
    dense = 4 * num_params + 2 * num_trainable
    attention = 12 * layers * heads * head_dim * seq_len
    return float(dense + attention)


def mfu(flops_per_step: float, step_time_s: float, peak: PeakFlops | None, world_size: int) -> float | None:
    """Model FLOPs utilisation of a step over ``world_size`` ranks; None without a peak.

    Never clamped: a value above 1 means the peak is wrong, and the warning says which one.
    """
    if peak is None:
        return None
    value = flops_per_step / step_time_s / (peak.flops * world_size)
    if value > 1:
        # One text per peak, so the warning shows once per run rather than at every step.
        warnings.warn(f"MFU above 1: the peak {peak.flops:.3g} FLOP/s is too low ({peak.source}); "
                      "delete a cached peak to measure it again on a quiet machine", stacklevel=2)
    return value


def device_peak(device: torch.device, mixed_precision: str, cache_dir: Path | None = None) -> PeakFlops | None:
    """The peak of ``device`` for ``parallelism.mixed_precision``; None for a GPU missing from the table."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        key = next((key for key in GPU_PEAK_FLOPS if key in name), None)
        return PeakFlops(GPU_PEAK_FLOPS[key], f"table: {name} (dense bf16)") if key else None
    return cpu_peak(COMPUTE_DTYPES[mixed_precision], cache_dir)


def record_peak(output_dir: str | Path, peak: PeakFlops | None) -> None:
    """State in the run folder which peak MFU divides by, and how it was chosen."""
    path = Path(output_dir) / MFU_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "peak_flops": asdict(peak) if peak else None,
        "mfu": "model FLOPs per step (PaLM appendix B accounting) / step_time_s / (peak_flops x world_size); "
               "absent from metrics.jsonl when peak_flops is null (a GPU missing from the table)",
    }, indent=2) + "\n")


def cpu_peak(dtype: torch.dtype = torch.float32, cache_dir: Path | None = None) -> PeakFlops:
    """This machine's matmul peak in ``dtype`` with this process's threads, measured once and cached.

    The first measurement waits up to QUIET_WAIT_S for a quiet moment; one taken on a
    busy machine is cached too (so runs agree) and replaced at a later launch that finds
    the machine quiet. Ranks on one machine take turns under a file lock.
    """
    num_threads = torch.get_num_threads()
    key = {"cpu": _cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "threads": num_threads,
           "dtype": str(dtype).removeprefix("torch.")}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = (cache_dir or default_cache_dir()) / "peak-flops" / f"cpu-{digest}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.with_suffix(".lock")):
        entry = json.loads(path.read_text()) if path.is_file() else None
        if entry is None:
            entry = _measure(key, dtype, quiet=_wait_for_quiet(num_threads))
        elif not entry["quiet"] and machine_is_quiet(num_threads):
            measured = _measure(key, dtype, quiet=True)  # a busy probe only reads low: keep the higher
            entry = {**measured, "flops": max(measured["flops"], entry["flops"])}
        else:
            return _cached_peak(entry, path)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(entry, indent=2) + "\n")
        tmp.replace(path)
    return _cached_peak(entry, path)


def _cached_peak(entry: dict, path: Path) -> PeakFlops:
    if entry["quiet"]:
        return PeakFlops(entry["flops"], f"measured once on this machine (cached at {path})")
    return PeakFlops(entry["flops"], f"measured once on this machine while it was busy (cached at {path}; "
                                     "measured again at a launch that finds it quiet)")


def _measure(key: dict, dtype: torch.dtype, quiet: bool) -> dict:
    flops = max(cpu_peak_flops(size, PEAK_PROBE_REPEATS, dtype) for size in PEAK_PROBE_SIZES)
    method = f"best of {PEAK_PROBE_REPEATS} matmuls of each size {PEAK_PROBE_SIZES}"
    return {**key, "flops": flops, "quiet": quiet, "method": method, "measured_at": round(time.time(), 1)}


def cpu_peak_flops(size: int = 1024, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Best matmul FLOP/s of this process's threads at one size (a probe; ``cpu_peak`` caches the peak)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def machine_is_quiet(num_threads: int) -> bool:
    """Whether, over half a second, other work left ``num_threads`` cores free for the probe."""
    num_cores = os.cpu_count() or 1
    busy_cores = psutil.cpu_percent(interval=0.5) / 100 * num_cores
    return busy_cores <= max(num_cores - num_threads, 0) + QUIET_SLACK_CORES


def _wait_for_quiet(num_threads: int) -> bool:
    """Whether the machine turned quiet within QUIET_WAIT_S (each check takes half a second)."""
    deadline = time.monotonic() + QUIET_WAIT_S
    while not machine_is_quiet(num_threads):
        if time.monotonic() >= deadline:
            return False
    return True


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# DeepSpeed optimizer attributes that hold model state, by part: the 16-bit (or
# training-dtype) copy, the reduced gradient partitions, and the fp32 master
# partitions (ZeRO-1/2 names first, ZeRO-3 names second).
DEEPSPEED_STATE = {
    "params": ("bit16_groups_flat", "fp16_partitioned_groups_flat"),
    "grads": ("averaged_gradients", "grad_partitions_flat_buffer"),
    "optimizer": ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"),
}




def _tensors(value) -> Iterator[torch.Tensor]:
    """Every tensor in nested dicts/lists (optimizer state, DeepSpeed's grouped buffers)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensors(item)


def _unique_bytes(tensors: Iterable[torch.Tensor | None], seen: set[int]) -> int:
    """Bytes of the storages behind ``tensors`` not counted yet (DTensors by their local shard)."""
    total = 0
    for tensor in tensors:
        if tensor is None:
            continue
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        storage = local.untyped_storage()
        if storage.nbytes() and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def held_bytes(strategy) -> dict[str, int]:
    """Parameter, gradient and optimizer-state bytes this rank holds."""
    optimizer = strategy.optimizer
    inner = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed wraps the torch AdamW
    params = list(strategy.model.parameters())
    parts = {
        "params": [*params, *(getattr(p, "ds_tensor", None) for p in params)],  # ZeRO-3 partitions
        "grads": [p.grad for p in params],
        "optimizer": list(_tensors(list(inner.state.values()))),
    }
    for part, attributes in DEEPSPEED_STATE.items():
        parts[part] += [t for name in attributes for t in _tensors(getattr(optimizer, name, None))]
    seen: set[int] = set()
    return {part: _unique_bytes(tensors, seen) for part, tensors in parts.items()}


def memory_stats(device: torch.device) -> dict[str, int]:
    rss = psutil.Process().memory_info().rss
    # The kernel updates the high-water mark lazily, so it can trail the current RSS.
    stats = {"rss_bytes": rss, "peak_rss_bytes": max(rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)}
    if device.type == "cuda":
        stats["device_bytes"] = torch.cuda.memory_allocated(device)
        stats["peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
    return stats
