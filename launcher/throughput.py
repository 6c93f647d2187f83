"""Model FLOPs utilisation and memory per rank.

FLOPs per trained token follow the PaLM paper's accounting (appendix B): 6N for
the dense matmuls of forward and backward, plus 12·L·H·Q·T for attention
scores. With adapters, frozen weights get no weight gradient, so the dense part
is 4N + 2N_trainable. The peak is the device's dense bf16/fp32 figure from a
table on GPU, or a matmul probe measured once per process on CPU.
"""

from __future__ import annotations

import functools
import resource
import time
from collections.abc import Iterable, Iterator

import psutil
import torch

# Dense peak FLOP/s per GPU (datasheets; bf16 tensor core, no sparsity).
GPU_PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 125e12,
    "V100": 125e12, "T4": 65e12, "MI300X": 1307e12,
}


def flops_per_token(config, num_params: int, num_trainable: int, seq_len: int) -> float:
    layers = getattr(config, "num_hidden_layers", 0)
    heads = getattr(config, "num_attention_heads", 0)
    head_dim = getattr(config, "head_dim", None) or getattr(config, "hidden_size", 0) // max(heads, 1)
    dense = 4 * num_params + 2 * num_trainable
    attention = 12 * layers * heads * head_dim * seq_len
    return float(dense + attention)


@functools.cache
def cpu_peak_flops(size: int = 1024, repeats: int = 5) -> float:
    """Best fp32 matmul FLOP/s of this process's threads (measured once)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return cpu_peak_flops()
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_PEAK_FLOPS.items() if key in name), None)


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
