"""Build the tokenizer, the model (full, LoRA or QLoRA), parameter groups,
optimizer and learning-rate schedule from a recipe."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch

from tunefleet.launcher.recipe import TINY_PREFIX, MethodConfig, ModelConfig, TrainConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(cfg: ModelConfig) -> str:
    """A loadable path or hub id; `tiny:<spec>` is built (once, cached) and returned as a folder."""
    if cfg.path.startswith(TINY_PREFIX):
        from tunefleet.launcher.tiny import ensure_tiny_model

        return str(ensure_tiny_model(cfg.path.removeprefix(TINY_PREFIX)))
    return cfg.path


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    cfg: ModelConfig,
    method: MethodConfig,
    path: str,
    *,
    init_context: contextlib.AbstractContextManager | None = None,
) -> torch.nn.Module:
    """Load weights by path (inside the strategy's init context) and attach adapters."""
    import transformers

    auto = (
        transformers.AutoModelForSequenceClassification
        if cfg.task == "sequence_classification"
        else transformers.AutoModelForCausalLM
    )
    kwargs: dict = {
        "dtype": _DTYPES[cfg.dtype],
        "attn_implementation": cfg.attn_implementation,
        "trust_remote_code": cfg.trust_remote_code,
    }
    if cfg.num_labels is not None:
        kwargs["num_labels"] = cfg.num_labels
    if method.kind == "qlora":
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=_DTYPES[cfg.dtype],
        )
    with init_context or contextlib.nullcontext():
        model = auto.from_pretrained(path, **kwargs)
    if method.kind in ("lora", "qlora"):
        model = _attach_lora(model, method, cfg)
    return model


def _attach_lora(model: torch.nn.Module, method: MethodConfig, cfg: ModelConfig) -> torch.nn.Module:
    import peft

    if method.kind == "qlora":
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = method.lora
    config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="SEQ_CLS" if cfg.task == "sequence_classification" else "CAUSAL_LM",
    )
    return peft.get_peft_model(model, config)


def param_groups(model: torch.nn.Module, train: TrainConfig) -> list[dict]:
    """AdamW groups: decay on matrices, none on biases and norms; frozen params left out."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # ZeRO-3 partitions parameters at load: their real shape is in ds_shape.
        ndim = len(getattr(param, "ds_shape", param.shape))
        (no_decay if ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": train.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def make_optimizer_factory(train: TrainConfig):
    def make(groups: list[dict]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            groups, lr=train.lr, betas=train.adam_betas, eps=train.adam_eps, foreach=True
        )

    return make


def lr_multiplier(step: int, train: TrainConfig) -> float:
    """Warm-up then constant/linear/cosine decay to `min_lr_ratio`; `step` counts from 0."""
    if step < train.warmup_steps:
        return (step + 1) / (train.warmup_steps + 1)
    if train.schedule == "constant":
        return 1.0
    span = max(train.max_steps - train.warmup_steps, 1)
    progress = min((step - train.warmup_steps) / span, 1.0)
    shape = 1.0 - progress if train.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return train.min_lr_ratio + (1.0 - train.min_lr_ratio) * shape


def make_scheduler_factory(train: TrainConfig):
    def make(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, train))

    return make


def save_final(model: torch.nn.Module, state_dict: dict, tokenizer, out_dir: str | Path) -> None:
    """Rank 0: HF safetensors folder (full) or a peft adapter folder (LoRA), plus tokenizer."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def check_model_path(cfg: ModelConfig) -> str | None:
    """A problem message if a local model path cannot be loaded, else None."""
    if cfg.path.startswith(TINY_PREFIX) or not cfg.path.startswith("/"):
        return None
    path = Path(cfg.path)
    if not path.is_dir():
        return f"model folder {path} does not exist; point model.path at a Hugging Face model folder"
    if not (path / "config.json").is_file():
        return f"{path} has no config.json; point model.path at a folder saved with save_pretrained"
    return None


def check_tiny_spec(cfg: ModelConfig) -> str | None:
    if not cfg.path.startswith(TINY_PREFIX):
        return None
    from tunefleet.launcher.tiny import TINY_SPECS

    spec = cfg.path.removeprefix(TINY_PREFIX)
    if spec not in TINY_SPECS:
        return f"unknown tiny model {spec!r}; choose one of {', '.join(TINY_SPECS)}"
    return None

