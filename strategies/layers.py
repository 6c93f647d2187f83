"""The model's repeated blocks, and what is done to each of them: sharding (fsdp) and compilation."""

from __future__ import annotations

import torch


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks to shard or compile one by one: HF's ``_no_split_modules`` classes.

    Innermost first, so nested blocks are sharded before the block holding them.
    Works through a PeftModel wrapper, which keeps the base model's layer classes.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    block_names = set(getattr(base, "_no_split_modules", None) or ())
    return [m for m in reversed(list(model.modules())) if type(m).__name__ in block_names]


def compile_layers(model: torch.nn.Module) -> int:
    """``torch.compile`` each decoder layer in place (regional compilation); returns how many.

    Compiling the repeated block rather than the whole model keeps the compile time to one
    block's (the layers share the graph: parameters are inputs, not constants) and keeps the
    layers as modules, so FSDP can still shard them one by one afterwards.
    """
    layers = decoder_layers(model)
    if not layers:
        raise TypeError(f"{type(model).__name__} names no decoder layer classes (_no_split_modules) to compile; "
                        "set parallelism.compile: false")
    for layer in layers:
        layer.compile()  # static shapes first; a varying document count then makes that dimension dynamic
    return len(layers)
