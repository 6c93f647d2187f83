"""PPO's value head: a scalar estimate of the return at every position, on the policy's own last hidden state.

The head shares the policy's trunk (as in Ziegler et al., 2019, and TRL's value-head models): one vector
and a bias on the final hidden state, the input of the language-model head. It is a submodule of the
model (``model.value_head``), so every strategy wraps, shards, optimizes and checkpoints it with the rest of
the weights, and a resume restores it; export leaves it out (``is_value_head_key``): the exported folder is
the policy alone. For adapters it stays trainable beside them, and PEFT's adapter folder does not save it.

The values are computed by a forward pre-hook on the language-model head, inside the model's forward, so
FSDP2 and ZeRO-3 have the head's parameters gathered when it runs. Every forward computes them (a dot
product per position), so the modules run in the same order in every forward, as ZeRO-3's prefetching
expects; ``values`` hands over the last forward's.
"""

from __future__ import annotations

import torch
from torch import nn

ATTRIBUTE = "value_head"


class ValueHead(nn.Module):
    """``hidden @ weight + bias`` in fp32; both start at zero (values 0), so the first updates move the policy
    only by the rewards' advantages."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size))
        self.bias = nn.Parameter(torch.zeros(1))  # 1-D: FSDP2 shards parameters along their first dimension
        self.last_values: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.float() @ self.weight.float() + self.bias.float()


def attach(model: nn.Module) -> ValueHead:
    """Give a causal LM a value head fed by the input of its output embeddings (before adapters are attached)."""
    head = ValueHead(model.config.get_text_config().hidden_size)
    setattr(model, ATTRIBUTE, head)

    def record(module: nn.Module, args: tuple) -> None:
        head.last_values = head(args[0])

    model.get_output_embeddings().register_forward_pre_hook(record)
    return head


def find(model: nn.Module) -> ValueHead:
    """The value head inside ``model`` (under any wrapper: DDP, PEFT, DeepSpeed's engine)."""
    head = next((m for m in model.modules() if isinstance(m, ValueHead)), None)
    if head is None:
        raise ValueError(f"{type(model).__name__} has no value head; load it with value_head=True")
    return head


def values(head: ValueHead) -> torch.Tensor:
    """[B, T] fp32 values of the positions of the last forward (taken: a later call gets the next forward's)."""
    taken, head.last_values = head.last_values, None
    if taken is None:
        raise RuntimeError("no forward ran since the values were last taken")
    return taken


def is_value_head_key(key: str) -> bool:
    """A state-dict key of the value head (left out of exported models)."""
    return key == ATTRIBUTE or key.startswith(f"{ATTRIBUTE}.") or f".{ATTRIBUTE}." in key
