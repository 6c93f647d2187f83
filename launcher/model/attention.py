"""Attention for packed rows without a dense block-diagonal mask.

A packed row holds several documents; each must attend only to itself. Given
restarting ``position_ids`` and no 2-D mask, transformers builds a
(batch, 1, seq, seq) block-diagonal mask for SDPA, which leaves the fused
flash kernel for a slower masked one. Instead, tunefleet registers its own
attention implementation, ``tunefleet_sdpa`` (what ``model.attn_implementation:
sdpa`` loads): for a forward that passes document boundaries
(``cu_seq_lens_q``, transformers' flash-attention keyword arguments), it runs
causal attention over each document through PyTorch's variable-length flash
kernel (``torch.nn.attention.varlen``) on CUDA, or SDPA document by document
elsewhere, and no mask is built; every other forward (unpacked rows, padding,
generation with a KV cache) is transformers' SDPA path, unchanged.

``forward(model, batch)`` is the one place a training or evaluation batch meets
the model: it adds the boundaries for packed batches when ``packed_kernel``
says so.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect

import torch
import torch.nn.functional as F

from tunefleet.launcher.model.inputs import model_inputs

NAME = "tunefleet_sdpa"
_boundaries_given = contextvars.ContextVar("tunefleet_boundaries_given", default=False)


def register() -> str:
    """Register ``tunefleet_sdpa`` with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    _find_varlen()
    AttentionInterface.register(NAME, packed_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, _mask)
    return NAME


def _mask(*args, **kwargs):
    """SDPA's mask, except while a forward passes document boundaries: then the attention needs none."""
    if _boundaries_given.get():
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None, **kwargs):
    """An attention function of transformers' interface: (batch, heads, seq, dim) in, (batch, seq, heads, dim)
    out. With ``cu_seq_lens_q`` (document starts over the flattened batch) attention is causal within
    each document; without, it is transformers' SDPA."""
    if cu_seq_lens_q is None or not getattr(module, "is_causal", True):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    batch, num_heads, seq, dim = query.shape
    flat = [t.transpose(1, 2).reshape(batch * seq, t.shape[1], dim) for t in (query, key, value)]
    scale = scaling if scaling is not None else dim**-0.5
    max_length = max_length_q or seq
    if query.is_cuda and _VARLEN is not None:
        # The kernel takes fp16/bf16 only. Under autocast (ddp's bf16) rotary embeddings leave queries and
        # keys in fp32, and autocast casts for SDPA but not for this op: cast as it would.
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else value.dtype
        out = _flash(*(t.to(dtype) for t in flat), cu_seq_lens_q, max_length, scale) \
            if dtype in (torch.float16, torch.bfloat16) else documents_attention(*flat, cu_seq_lens_q, scale)
    else:
        out = documents_attention(*flat, cu_seq_lens_q, scale)
    return out.view(batch, seq, num_heads, dim), None


_VARLEN = None  # torch.nn.attention.varlen.varlen_attn, once `register` or `packed_kernel` has looked
_VARLEN_ARGS: frozenset[str] = frozenset()
_looked = False


def _find_varlen() -> None:
    """Find PyTorch's variable-length flash attention and the keyword arguments this version takes (they
    changed between releases: `is_causal` before `window_size`, `scale` and `enable_gqa` added later).
    Looked up once, before any forward (importing it loads torch._dynamo, so not at import), and kept in
    module globals so that compiled layers see constants."""
    global _VARLEN, _VARLEN_ARGS, _looked
    if _looked:
        return
    _looked = True
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return
    _VARLEN, _VARLEN_ARGS = varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _flash(query, key, value, cu_seq_lens: torch.Tensor, max_length: int, scale: float) -> torch.Tensor:
    if "scale" not in _VARLEN_ARGS and abs(scale - query.shape[-1] ** -0.5) > 1e-12:
        return documents_attention(query, key, value, cu_seq_lens, scale)  # this version has the default only
    kwargs: dict = {"window_size": (-1, 0)} if "window_size" in _VARLEN_ARGS else {"is_causal": True}
    if "scale" in _VARLEN_ARGS:
        kwargs["scale"] = scale
    if key.shape[1] != query.shape[1]:
        if "enable_gqa" in _VARLEN_ARGS:
            kwargs["enable_gqa"] = True
        else:  # one key/value head per query head
            repeats = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(repeats, dim=1), value.repeat_interleave(repeats, dim=1)
    cu = cu_seq_lens.to(torch.int32)
    return _VARLEN(query, key, value, cu, cu, max_length, max_length, **kwargs)


def documents_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_lens: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """Causal SDPA over each document of a flattened (tokens, heads, dim) batch, one call per document."""
    gqa = key.shape[1] != query.shape[1]
    outs = []
    for start, end in zip(cu_seq_lens[:-1].tolist(), cu_seq_lens[1:].tolist(), strict=True):
        q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))
        outs.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
                    .transpose(0, 1))
    return torch.cat(outs)


def document_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative document boundaries over the flattened batch (int32, first 0, last = all tokens): a
    document starts wherever its position restarts at 0 (packing restarts the pad tail too)."""
    flat = position_ids.flatten()
    starts = torch.nonzero(flat == 0).flatten()
    total = torch.tensor([flat.numel()], device=flat.device)
    return torch.cat([starts, total]).to(torch.int32)


def packed_kernel(device: torch.device) -> bool:
    """Whether packed batches on ``device`` pass document boundaries (the fused kernel) rather than have
    transformers build the block-diagonal mask: on CUDA when PyTorch has the variable-length kernel."""
    _find_varlen()
    return device.type == "cuda" and _VARLEN is not None


def forward(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, boundaries: bool | None = None, **kwargs):
    """``model`` on ``batch`` (from ``collate``, on the model's device). Packed batches pass document
    boundaries when ``boundaries`` (default: ``packed_kernel`` of the batch's device)."""
    inputs = model_inputs(batch)
    positions = inputs.get("position_ids")
    if boundaries is None:
        boundaries = positions is not None and packed_kernel(positions.device)
    if not (boundaries and positions is not None):
        return model(**inputs, use_cache=False, **kwargs)
    cu_seq_lens = document_starts(positions)
    width = positions.shape[-1]
    with _given():
        return model(**inputs, use_cache=False, cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens,
                     max_length_q=width, max_length_k=width, **kwargs)


@contextlib.contextmanager
def _given():
    token = _boundaries_given.set(True)
    try:
        yield
    finally:
        _boundaries_given.reset(token)
