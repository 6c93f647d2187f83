"""FSDP2: ``fully_shard`` each decoder layer, then the root, on a device mesh.

Every rank holds 1/N of each parameter, gradient and optimizer state as
DTensor shards; a layer's full parameters exist only while it computes. With
``plan.hsdp`` on several nodes the mesh is 2-D: replicate across nodes, shard
within a node, so the all-gathers stay on the fast intra-node links.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Literal

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from tunefleet.strategies import dcp_state
from tunefleet.strategies.activation_checkpointing import enable_activation_checkpointing
from tunefleet.strategies.base import (
    OptimizerFactory,
    SchedulerFactory,
    Strategy,
    StrategyPlan,
)
from tunefleet.strategies.dcp_state import AsyncSave
from tunefleet.strategies.layers import compile_layers, decoder_layers

_COMPUTE_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def mesh_layout(plan: StrategyPlan) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Shape and dimension names of the data-parallel mesh for ``plan``."""
    if plan.hsdp and plan.num_nodes > 1:
        return (plan.num_nodes, plan.workers_per_node), ("replicate", "shard")
    return (plan.world_size,), ("shard",)


def parallelize(
    model: torch.nn.Module,
    mesh: DeviceMesh,
    *,
    mixed_precision: Literal["no", "bf16", "fp16"],
    reshard_after_forward: bool,
    offload: bool,
    activation_checkpointing: bool,
    compile: bool = False,
) -> torch.nn.Module:
    """Activation checkpointing, then compilation, then sharding of each decoder layer and the root."""
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    if compile:
        compile_layers(model)
    dtype = _COMPUTE_DTYPES[mixed_precision]
    # Gradients are reduced in fp32 so averaging over ranks loses no precision.
    mp_policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
    offload_policy = CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda") if offload else OffloadPolicy()
    layers = decoder_layers(model)
    if not layers:
        warnings.warn(
            f"{type(model).__name__} names no decoder layer classes (_no_split_modules); "
            "FSDP shards it as one unit, so every rank gathers all parameters at once",
            stacklevel=2,
        )
    for module in [*layers, model]:
        fully_shard(
            module,
            mesh=mesh,
            reshard_after_forward=reshard_after_forward,
            mp_policy=mp_policy,
            offload_policy=offload_policy,
        )
    return model


def _remap_groups(param_groups: list[dict], names: dict[int, str], module: torch.nn.Module) -> list[dict]:
    """Point optimizer groups built on the original parameters at the sharded ones."""
    sharded = dict(module.named_parameters())
    return [{**group, "params": [sharded[names[id(p)]] for p in group["params"]]} for group in param_groups]


class FSDPStrategy(AsyncSave, Strategy):
    name = "fsdp"
    shards_parameters = True

    def setup(
        self,
        module: torch.nn.Module,
        make_optimizer: OptimizerFactory,
        make_scheduler: SchedulerFactory,
        param_groups: list[dict],
    ) -> None:
        names = {id(p): name for name, p in module.named_parameters()}
        shape, dim_names = mesh_layout(self.plan)
        mesh = init_device_mesh(self.plan.device_type, shape, mesh_dim_names=dim_names)
        self.model = parallelize(
            module,
            mesh,
            mixed_precision=self.plan.mixed_precision,
            reshard_after_forward=True,
            offload=self.plan.cpu_offload,
            activation_checkpointing=self.plan.activation_checkpointing,
            compile=self.plan.compile,
        )
        self.optimizer = make_optimizer(_remap_groups(param_groups, names, module))
        self.scheduler = make_scheduler(self.optimizer)

    @contextlib.contextmanager
    def no_sync(self, enabled: bool) -> Iterator[None]:
        self.model.set_requires_gradient_sync(not enabled)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def optimizer_step(self) -> float | None:
        self.wait_staged()  # a background checkpoint must have copied the state first
        params = [p for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()  # the local norm is partial: reduce over shards
        if self.plan.max_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(params, self.plan.max_grad_norm, norm, foreach=True)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def save(self, path: str) -> None:
        dcp_state.save_dcp(path, self.model, self.optimizer, self.scheduler)

    def load(self, path: str) -> None:
        dcp_state.load_dcp(path, self.model, self.optimizer, self.scheduler)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.model, options=options)
        return state if dist.get_rank() == 0 else {}
