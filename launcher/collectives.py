"""Every collective tunefleet issues itself, on a process group that serves its tensors' device.

Two planes travel between ranks:

- the data plane: tensors on the training device (token counts, loss sums, eval
  figures, the preflight bandwidth probe), on the default group: NCCL on GPUs,
  gloo on CPUs;
- the control plane: small host values (the stop flag, memory statistics,
  barriers around files, pickled reports), always on the CPU.

NCCL has no CPU backend, so a group made with ``backend="nccl"`` fails on the
control plane with "No backend type associated with device type cpu". On GPUs
the driver therefore asks Ray Train for ``"cpu:gloo,cuda:nccl"``
(``process_group_backend``): one group, NCCL for device tensors and gloo for host
tensors. Whatever group a worker is given, ``host_group`` is one that serves
the CPU: the default group when its backend has a CPU entry, else a gloo group
made once for this process group. Nothing here is bound to Ray.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

_host_groups: list[tuple[Any, Any]] = []  # (default group, the host group made for it)


def process_group_backend(use_gpu: bool) -> str:
    """The torch.distributed backend string the workers' default group is made with."""
    return "cpu:gloo,cuda:nccl" if use_gpu else "gloo"


def serves_cpu(group=None) -> bool:
    """Whether ``group`` (default: the default group) has a backend for CPU tensors."""
    # e.g. "cpu:gloo,cuda:gloo" (backend "gloo"), "cuda:nccl" (backend "nccl"), "cpu:gloo,cuda:nccl"
    return any(entry.split(":")[0] == "cpu" for entry in dist.get_backend_config(group).split(","))


def host_group():
    """Collective on first use: the group that carries CPU tensors (None: the default group)."""
    if serves_cpu():
        return None
    world = dist.group.WORLD
    for default, made in _host_groups:
        if default is world:
            return made
    made = dist.new_group(backend="gloo")
    _host_groups[:] = [(world, made)]  # a new default group replaces the old entry
    return made


def group_for(tensor: torch.Tensor):
    """The group for a collective on ``tensor``: the host group for CPU tensors, else the default."""
    return host_group() if tensor.device.type == "cpu" else None


def all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Reduce ``tensor`` over ranks in place (a no-op without a process group); returns it."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=op, group=group_for(tensor))
    return tensor


def all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """``tensor`` of every rank, in rank order."""
    if not dist.is_initialized():
        return [tensor]
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor, group=group_for(tensor))
    return gathered


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s ``tensor`` on every rank, in place; returns it."""
    if dist.is_initialized():
        dist.broadcast(tensor, src=src, group=group_for(tensor))
    return tensor


def barrier(group=None) -> None:
    """Wait for every rank, on the host (no device work queued); ``group``: a gloo group of the caller's
    own (the background checkpoint thread has one), else the host group."""
    if dist.is_initialized():
        dist.barrier(group=group if group is not None else host_group())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank."""
    if not dist.is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src, group=host_group())
    return holder[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order."""
    if not dist.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj, group=host_group())
    return gathered
