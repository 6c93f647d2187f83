"""What a batch hands the model: the label that means "no loss here", and the forward's keyword arguments."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # a label the loss skips (prompt and padding tokens), as Hugging Face models expect
# A batch of prompt rows (online RL) also carries each row's other fields, as dicts, for the reward functions.
ROW_FIELDS = "row_fields"


def on_device(batch: dict, device: torch.device, *, non_blocking: bool = False) -> dict[str, torch.Tensor]:
    """The batch's tensors on ``device``; the row fields stay behind (no model reads them)."""
    return {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keyword arguments of the model's forward for a batch from ``collate``.

    Packed batches keep their 2-D ``attention_mask`` for counting tokens but do
    not pass it: transformers builds the per-document (block-diagonal causal)
    mask from restarting ``position_ids`` only when no 2-D mask is given and the
    call has no KV cache (``use_cache=False``); on GPU with flash attention the
    same inputs take the variable-length path.
    """
    drop = {"labels", "attention_mask"} if "position_ids" in batch else {"labels"}
    return {k: v for k, v in batch.items() if k not in drop}
