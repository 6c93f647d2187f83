"""Activation checkpointing: recompute each decoder layer's activations in backward instead of keeping them."""

from __future__ import annotations

import torch


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
