"""Helpers shared by strategies: DCP state save/load and activation checkpointing."""

from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)


def enable_activation_checkpointing(module: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant)."""
    target = module
    # A PeftModel forwards the call to the transformers model underneath.
    if not hasattr(target, "gradient_checkpointing_enable") and hasattr(target, "get_base_model"):
        target = target.get_base_model()
    if not hasattr(target, "gradient_checkpointing_enable"):
        raise TypeError(f"{type(module).__name__} does not support activation checkpointing")
    target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(target, "config"):
        target.config.use_cache = False


def _app_state(model, optimizer, scheduler, options: StateDictOptions | None = None) -> dict:
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    return {"model": model_sd, "optim": optim_sd, "scheduler": scheduler.state_dict()}


def save_dcp(path: str, model, optimizer, scheduler) -> None:
    """Collective: each rank writes its shard of model/optimizer; scheduler rides along."""
    dcp.save(_app_state(model, optimizer, scheduler), checkpoint_id=path)


def save_dcp_async(path: str, model, optimizer, scheduler, group):
    """Start a background save on ``group`` (its own gloo group: sharing the training
    group makes gloo mismatch collectives). Returns a future; training may continue
    once this returns, because DCP has staged a copy of the state."""
    return dcp.async_save(_app_state(model, optimizer, scheduler), checkpoint_id=path, process_group=group)


def load_dcp(path: str, model, optimizer, scheduler) -> None:
    """Collective: load in place (DCP reshards to the current world size)."""
    state = _app_state(model, optimizer, scheduler)
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    scheduler.load_state_dict(state["scheduler"])
