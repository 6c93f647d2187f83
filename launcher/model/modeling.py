"""Build the tokenizer, the model (full, or a peft adapter: LoRA, QLoRA, IA3,
prefix or prompt tuning), parameter groups, optimizer and learning-rate schedule
from a recipe."""

from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path

import torch

from tunefleet.launcher.config import ADAPTER_KINDS, TINY_PREFIX, MethodConfig, ModelConfig, TrainConfig
from tunefleet.launcher.model import attention, value_head
from tunefleet.launcher.model import param_groups as _param_groups
from tunefleet.launcher.model.param_groups import apply_unfreeze as apply_unfreeze  # the loop calls it
from tunefleet.launcher.model.param_groups import freeze

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(cfg: ModelConfig) -> str:
    """A loadable path or hub id; `tiny:<spec>` is built (once, cached) and returned as a folder."""
    if cfg.path.startswith(TINY_PREFIX):
        from tunefleet.launcher.model.tiny import ensure_tiny_model

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
    with_value_head: bool = False,
) -> torch.nn.Module:
    """Load weights by path (inside the strategy's init context), freeze ``method.freeze``, give it PPO's value
    head if asked (``value_head.py``) and attach adapters.

    The names of weights the folder lacks (newly initialised, e.g. a classifier head or the value head) are
    kept on the returned model as ``tunefleet_new_weights`` for ``train.head_lr``.
    """
    import transformers

    auto = (
        transformers.AutoModelForSequenceClassification
        if cfg.task == "sequence_classification"
        else transformers.AutoModelForCausalLM
    )
    kwargs: dict = {
        "dtype": _DTYPES[cfg.dtype],
        # sdpa: transformers' SDPA, with packed rows on the fused variable-length kernel (attention.py)
        "attn_implementation": attention.register() if cfg.attn_implementation == "sdpa" else cfg.attn_implementation,
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
        model, loading = auto.from_pretrained(path, output_loading_info=True, **kwargs)
    new_weights = frozenset(loading["missing_keys"])
    freeze(model, method.freeze)
    if with_value_head:
        head = value_head.attach(model)
        new_weights |= {f"{value_head.ATTRIBUTE}.{name}" for name, _ in head.named_parameters()}
    if method.kind in ADAPTER_KINDS:
        model = attach_adapter(model, method, cfg, path)
        if with_value_head:
            head.requires_grad_(True)  # peft froze everything but its adapters
    model.tunefleet_new_weights = new_weights
    return model


def peft_config(method: MethodConfig, task: str, base_path: str):
    """The peft config of ``method`` (one of ADAPTER_KINDS) for a base model at ``base_path``."""
    import peft

    common = {"task_type": "SEQ_CLS" if task == "sequence_classification" else "CAUSAL_LM",
              "base_model_name_or_path": base_path}
    if method.kind in ("lora", "qlora"):
        lora = method.lora
        return peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                               target_modules=lora.target_modules, use_dora=lora.use_dora,
                               use_rslora=lora.use_rslora, **common)
    if method.kind == "ia3":
        return peft.IA3Config(target_modules=method.ia3.target_modules,
                              feedforward_modules=method.ia3.feedforward_modules, **common)
    tokens = method.virtual_tokens
    if method.kind == "prefix_tuning":
        return peft.PrefixTuningConfig(num_virtual_tokens=tokens.num, prefix_projection=tokens.projection, **common)
    assert method.kind == "prompt_tuning", method.kind
    from_text = {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": tokens.init_text,
                 "tokenizer_name_or_path": base_path} if tokens.init_text is not None else {}
    return peft.PromptTuningConfig(num_virtual_tokens=tokens.num, **from_text, **common)


def attach_adapter(model: torch.nn.Module, method: MethodConfig, cfg: ModelConfig, path: str) -> torch.nn.Module:
    import peft

    if method.kind == "qlora":
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if not getattr(model, "name_or_path", None):  # built from a config: peft would record None and warn
        model.name_or_path = path
    model = peft.get_peft_model(model, peft_config(method, cfg.task, path))
    if method.kind == "prompt_tuning" and cfg.task == "causal_lm":
        model.register_forward_hook(_drop_virtual_positions, with_kwargs=True)
    return model


def _drop_virtual_positions(module, args, kwargs, output):
    """Prompt tuning prepends its virtual tokens to the input, and peft returns their logits too; the loss
    (``steps``, ``dpo``) lines logits up with the input's labels, so drop them."""
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    extra = output.logits.shape[1] - input_ids.shape[1]
    if extra > 0:
        output.logits = output.logits[:, extra:]
    return output


def param_groups(model: torch.nn.Module, train: TrainConfig) -> list[dict]:
    """AdamW groups with per-group rates; see ``tunefleet.launcher.model.param_groups``."""
    return _param_groups.param_groups(model, train)


def make_optimizer_factory(train: TrainConfig):
    def make(groups: list[dict]) -> torch.optim.Optimizer:
        impl = train.optimizer_impl
        if impl == "auto":
            on_gpu = any(p.is_cuda for group in groups for p in group["params"])
            impl = "fused" if on_gpu else "foreach"
        return torch.optim.AdamW(groups, lr=train.lr, betas=train.adam_betas, eps=train.adam_eps, **{impl: True})

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


def make_scheduler_factory(train: TrainConfig, updates_per_step: int = 1):
    """The learning-rate schedule over train steps; with several optimizer updates per step (online RL's
    `method.rl.epochs`) every update of a step gets that step's rate."""

    def make(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda update: lr_multiplier(update // updates_per_step, train))

    return make


def save_final(model: torch.nn.Module, state_dict: dict, tokenizer, out_dir: str | Path) -> None:
    """Rank 0: HF safetensors folder (full) or a peft adapter folder (every other kind), plus tokenizer."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_dict = {key: value for key, value in state_dict.items() if not value_head.is_value_head_key(key)}
    if getattr(model, "prompt_encoder", None):
        _save_prompt_adapter(model, state_dict, out_dir)
    else:
        model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _save_prompt_adapter(model: torch.nn.Module, state_dict: dict, out_dir: Path) -> None:
    """Prefix/prompt tuning as peft saves it, computed from the gathered ``state_dict``.

    peft's ``save_pretrained`` ignores a given state dict for these methods and runs the live prompt
    encoder instead, which fails on sharded parameters (FSDP2 DTensors: "mixed torch.Tensor and
    DTensor"), so the saved table (``prompt_embeddings``) is computed here the same way.
    """
    import peft
    from safetensors.torch import save_file

    config = model.peft_config["default"]
    prefix = "prompt_encoder.default."
    weights = {key.removeprefix(prefix): value for key, value in state_dict.items() if key.startswith(prefix)}
    if getattr(config, "prefix_projection", False):
        encoder = peft.tuners.prefix_tuning.PrefixEncoder(config)
        encoder.load_state_dict(weights)
        with torch.no_grad():
            table = encoder(torch.arange(config.num_virtual_tokens)[None])[0]
    else:
        table = weights["embedding.weight"]  # the encoder's output for tokens 0..n-1 is its table
    saved = copy.copy(config)
    saved.inference_mode = True  # as peft saves it
    saved.save_pretrained(out_dir)
    save_file({"prompt_embeddings": table.detach().cpu().contiguous()}, str(out_dir / "adapter_model.safetensors"),
              metadata={"format": "pt"})


def check_model_path(cfg: ModelConfig) -> str | None:
    """A problem message if a local model path cannot be loaded, else None."""
    if cfg.path.startswith(TINY_PREFIX) or not cfg.path.startswith("/"):
        return None
    path = Path(cfg.path)
    if path.is_file():
        return (f"{path} is a file, not a folder; point model.path at the Hugging Face model folder "
                "(the one holding config.json)")
    if not path.is_dir():
        return f"model folder {path} does not exist; point model.path at a Hugging Face model folder"
    if not (path / "config.json").is_file():
        return f"{path} has no config.json; point model.path at a folder saved with save_pretrained"
    return None


def check_tiny_spec(cfg: ModelConfig) -> str | None:
    if not cfg.path.startswith(TINY_PREFIX):
        return None
    from tunefleet.launcher.model.tiny import TINY_SPECS

    spec = cfg.path.removeprefix(TINY_PREFIX)
    if spec not in TINY_SPECS:
        return f"unknown tiny model {spec!r}; choose one of {', '.join(TINY_SPECS)}"
    return None

