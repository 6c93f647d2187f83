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


def held_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes of parameters, gradients and optimizer state this rank holds (local shards only)."""
    tensors = {}
    for param in model.parameters():
        for tensor in (param, param.grad):
            if tensor is not None:
                local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
                tensors[id(local)] = local.numel() * local.element_size()
    if optimizer is not None:
        for state in optimizer.state.values():
            for value in state.values():
                if torch.is_tensor(value):
                    local = value.to_local() if hasattr(value, "to_local") else value
                    tensors[id(local)] = local.numel() * local.element_size()
    return sum(tensors.values())


def memory_stats(device: torch.device) -> dict[str, int]:
    rss = psutil.Process().memory_info().rss
    # The kernel updates the high-water mark lazily, so it can trail the current RSS.
    stats = {"rss_bytes": rss, "peak_rss_bytes": max(rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)}
    if device.type == "cuda":
        stats["device_bytes"] = torch.cuda.memory_allocated(device)
        stats["peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
    return stats
