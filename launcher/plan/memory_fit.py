"""The memory planner: which strategy fits, decided from the model's config alone.

The model is built on the meta device (no weights are read, nothing is
downloaded): from ``config.json`` for a local folder, from ``tiny_config`` for
``tiny:<spec>``, and for hub ids from the offline table of public architecture
configs in ``model_configs/`` (or a config already in the local Hugging Face
cache). Its exact parameter counts feed ``tunefleet.strategies.memory``, which
estimates what one rank of each strategy holds. ``auto`` picks the simplest
strategy that fits with headroom, in the order of ``STRATEGY_ORDER``: on GPUs
against the GPU memory, on CPU against this machine's available memory per
worker.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Literal

import psutil
import torch
from pydantic import BaseModel, ConfigDict, Field

from tunefleet.launcher.config import ADAPTER_KINDS, TINY_PREFIX, ModelConfig, Recipe
from tunefleet.launcher.errors import Problem, RecipeError, UserError
from tunefleet.launcher.model.modeling import check_model_path
from tunefleet.strategies import memory
from tunefleet.strategies.compat import check_compatibility
from tunefleet.strategies.layers import decoder_layers
from tunefleet.strategies.memory import GiB, MemoryEstimate, Method, ModelShape, TrainingSetup

# Simplest first: auto takes the first one that fits.
STRATEGY_ORDER = ("ddp", "deepspeed_zero2", "fsdp", "deepspeed_zero3")
OFFLOADABLE = ("deepspeed_zero2", "fsdp", "deepspeed_zero3")
# Left free for the CUDA context, allocator fragmentation and temporaries.
USABLE_FRACTION = 0.9
DEFAULT_GPU_MEMORY_GIB = 80.0
_WEIGHT_BYTES: dict[str, Literal[2, 4]] = {"float32": 4, "bfloat16": 2, "float16": 2}


# --------------------------------------------------------------------------- the model
@cache
def architecture_table() -> dict[str, dict]:
    """Shipped architecture configs by lower-case hub id (each file lists its ids)."""
    table = {}
    for entry in (resources.files("tunefleet.launcher.model") / "model_configs").iterdir():
        if entry.name.endswith(".json"):
            data = json.loads(entry.read_text())
            table.update({model_id.lower(): data["config"] for model_id in data["ids"]})
    return table


def architecture_config(cfg: ModelConfig):
    """The transformers config of ``cfg.path``, without reading weights or using the network."""
    from transformers import AutoConfig

    if cfg.path.startswith(TINY_PREFIX):
        from tunefleet.launcher.model.tiny import tiny_config

        return tiny_config(cfg.path.removeprefix(TINY_PREFIX))
    if cfg.path.startswith("/"):
        if problem := check_model_path(cfg):
            raise UserError(f"model.path: {problem}")
        return AutoConfig.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
    if (known := architecture_table().get(cfg.path.lower())) is not None:
        return AutoConfig.for_model(**known)
    try:
        return AutoConfig.from_pretrained(cfg.path, local_files_only=True, trust_remote_code=cfg.trust_remote_code)
    except OSError:
        raise UserError(
            f"model.path: no architecture config for {cfg.path!r} offline; point model.path at a local "
            f"folder with config.json, or add launcher/model/model_configs/<name>.json (known: "
            f"{', '.join(sorted(architecture_table()))})"
        ) from None


def build_meta_model(recipe: Recipe) -> torch.nn.Module:
    """The recipe's model (frozen as ``method.freeze`` says, with its peft adapters) on the meta device:
    shapes only, no storage. Freeze and unfreeze patterns that match nothing raise RecipeError here,
    before any worker starts."""
    import transformers

    from tunefleet.launcher.model.modeling import attach_adapter, freeze  # what training does
    from tunefleet.launcher.model.param_groups import unfreeze_steps

    cfg = recipe.model
    config = architecture_config(cfg)
    if cfg.num_labels is not None:
        config.num_labels = cfg.num_labels
    auto = (
        transformers.AutoModelForSequenceClassification
        if cfg.task == "sequence_classification"
        else transformers.AutoModelForCausalLM
    )
    with torch.device("meta"):
        model = auto.from_config(config, trust_remote_code=cfg.trust_remote_code)
        freeze(model, recipe.method.freeze)
        if recipe.method.kind in ADAPTER_KINDS:
            # Same shapes without reading a tokenizer: text initialisation only sets values.
            tokens = recipe.method.virtual_tokens.model_copy(update={"init_text": None})
            model = attach_adapter(model, recipe.method.model_copy(update={"virtual_tokens": tokens}), cfg, cfg.path)
    unfreeze_steps([name for name, p in model.named_parameters() if p.requires_grad], recipe.train.unfreeze_schedule)
    return model


def _num_params(module: torch.nn.Module, recurse: bool = True) -> int:
    return sum(p.numel() for p in module.parameters(recurse=recurse))


def model_shape(model: torch.nn.Module, *, quantize_base: bool) -> ModelShape:
    """Exact counts from a (meta) model; ``quantize_base`` marks frozen Linears in the layers as 4-bit."""
    layers = decoder_layers(model)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    params = list(model.parameters())  # tied parameters appear once
    quantized = sum(
        m.weight.numel()
        for layer in layers
        for m in layer.modules()
        if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad
    )
    text = model.config.get_text_config()
    return ModelShape(
        num_params=sum(p.numel() for p in params),
        num_trainable_params=sum(p.numel() for p in params if p.requires_grad),
        num_quantized_params=quantized if quantize_base else 0,
        num_persistent_params=sum(p.numel() for p in params if p.numel() <= memory.ZERO3_PERSISTENCE_THRESHOLD),
        num_root_params=sum(p.numel() for p in params if id(p) not in in_layers),
        num_largest_layer_params=max((_num_params(layer) for layer in layers), default=0),
        num_largest_module_params=max(_num_params(m, recurse=False) for m in model.modules()),
        num_layers=text.num_hidden_layers,
        hidden_size=text.hidden_size,
        num_heads=text.num_attention_heads,
        vocab_size=text.vocab_size,
    )


def training_setup(recipe: Recipe, world_size: int) -> TrainingSetup:
    par, rl = recipe.parallelism, recipe.method.rl
    online_rl = recipe.method.online_rl  # each prompt trains as group_size prompt + completion rows
    return TrainingSetup(
        method=recipe.method.kind,
        objective=recipe.method.objective,
        world_size=world_size,
        weight_bytes=_WEIGHT_BYTES[recipe.model.dtype],
        mixed_precision=par.mixed_precision,
        seq_len=recipe.data.max_seq_len + (rl.max_new_tokens if online_rl else 0),
        micro_batch_size=recipe.train.micro_batch_size * (rl.group_size if online_rl else 1),
        activation_checkpointing=par.activation_checkpointing,
        eager_attention=recipe.model.attn_implementation == "eager",
        causal_lm=recipe.model.task == "causal_lm",
    )


# --------------------------------------------------------------------------- the report
class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StrategyFit(_Frozen):
    """One row of the plan: a strategy's memory and whether the planner may pick it."""

    memory: MemoryEstimate = Field(description="What one rank holds, by part.")
    need_bytes: int = Field(description="Compared with the capacity: device bytes on GPU; all bytes per worker on CPU.")
    host_bytes: int = Field(description="Host memory per worker: offloaded state or the loading copy, the larger.")
    fits: bool = Field(description="`need_bytes` is within the usable fraction of the capacity.")
    blocked: str | None = Field(None, description="Why `auto` may not pick this row (compatibility, offload setting).")


class PlanReport(_Frozen):
    """The planner's estimate for every strategy and its choice; frozen so a run can record it."""

    model_path: str = Field(description="The recipe's model.path.")
    method: Method = Field(description="The recipe's method.kind.")
    num_params: int = Field(description="All parameters (exact, from the meta-device model).")
    num_trainable_params: int = Field(description="Parameters the optimizer updates.")
    device: Literal["gpu", "cpu"] = Field(description="What a worker trains on.")
    num_nodes: int = Field(description="Machines.")
    workers_per_node: int = Field(description="Workers (GPUs) per machine.")
    capacity_bytes: int = Field(description="Memory per GPU, or available host memory per CPU worker.")
    usable_fraction: float = Field(description="Share of the capacity a strategy may plan to use.")
    setup: TrainingSetup = Field(description="Numerics and batch shape the estimate assumes.")
    rows: tuple[StrategyFit, ...] = Field(description="Every strategy, simplest first; offload variants last.")
    choice: str | None = Field(description="What `auto` picks; none when nothing fits.")
    reason: str = Field(description="Why, in one sentence (or what to change when nothing fits).")

    @property
    def per(self) -> str:
        return _per(self.device == "gpu")

    def row_for(self, strategy: str) -> StrategyFit:
        """``strategy``'s row under the recipe's own offload setting (rows before the fallbacks)."""
        return next(row for row in self.rows[: len(STRATEGY_ORDER)] if row.memory.strategy == strategy)


def gib(num_bytes: float) -> str:
    return f"{num_bytes / GiB:.1f} GiB"


def row_name(row: StrategyFit) -> str:
    return row.memory.strategy + (" + cpu offload" if row.memory.cpu_offload else "")


def count_text(num: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if num >= size:
            return f"{num / size:.3g}{unit}"
    return str(num)


def _blocked(recipe: Recipe, strategy: str, *, cpu_offload: bool, on_gpu: bool) -> str | None:
    par = recipe.parallelism
    if cpu_offload != par.cpu_offload:
        return "needs parallelism.cpu_offload: true" if cpu_offload else "parallelism.cpu_offload is true"
    problems = check_compatibility(
        strategy, recipe.method.kind, use_gpu=on_gpu, cpu_offload=cpu_offload, mixed_precision=par.mixed_precision,
        unfreeze_schedule=bool(recipe.train.unfreeze_schedule),
    )
    return "; ".join(problems) or None


def _strategy_fit(recipe: Recipe, estimate: MemoryEstimate, *, on_gpu: bool, capacity_bytes: int) -> StrategyFit:
    """GPU: the device parts against the GPU; CPU: everything a worker holds against its share of RAM."""
    host = max(estimate.load_bytes, estimate.offloaded_bytes)
    need = estimate.device_bytes if on_gpu else max(estimate.device_bytes + estimate.offloaded_bytes, host)
    return StrategyFit(
        memory=estimate,
        need_bytes=need,
        host_bytes=host if on_gpu else need,
        fits=need <= capacity_bytes * USABLE_FRACTION,
        blocked=_blocked(recipe, estimate.strategy, cpu_offload=estimate.cpu_offload, on_gpu=on_gpu),
    )


def _variants(recipe: Recipe, on_gpu: bool) -> list[tuple[str, bool]]:
    """(strategy, cpu_offload) rows: the recipe's offload setting, then offload as a fallback on GPU."""
    rows = [(name, recipe.parallelism.cpu_offload and name in OFFLOADABLE) for name in STRATEGY_ORDER]
    if on_gpu and not recipe.parallelism.cpu_offload:
        rows += [(name, True) for name in OFFLOADABLE]
    return rows


def _capacity_bytes(on_gpu: bool, gpu_memory_gib: float | None, workers_per_node: int) -> int:
    if on_gpu:
        return int((gpu_memory_gib or DEFAULT_GPU_MEMORY_GIB) * GiB)
    return psutil.virtual_memory().available // workers_per_node


def _per(on_gpu: bool) -> str:
    return "per device" if on_gpu else "per worker"


def _choose(rows: tuple[StrategyFit, ...], capacity_bytes: int, per: str) -> tuple[str | None, str]:
    """The first row that fits and may be picked, or why none can."""
    for row in rows:
        if row.fits and row.blocked is None:
            return row.memory.strategy, f"{row_name(row)} fits: {gib(row.need_bytes)} of {gib(capacity_bytes)} {per}"
    smallest = min(rows, key=lambda row: row.need_bytes)
    blocked = f"; {smallest.blocked}" if smallest.blocked else ""
    return None, (
        f"no strategy fits in {USABLE_FRACTION:.0%} of {gib(capacity_bytes)} {per}; the smallest need is "
        f"{gib(smallest.need_bytes)} ({row_name(smallest)}{blocked}). Add workers (parallelism.num_nodes, "
        "parallelism.workers_per_node), set parallelism.activation_checkpointing: true, lower "
        "train.micro_batch_size or data.max_seq_len, or use method.kind: lora"
    )


def plan_report(
    recipe: Recipe,
    *,
    num_nodes: int | None = None,
    gpus_per_node: int | None = None,
    gpu_memory_gib: float | None = None,
) -> PlanReport:
    """Estimate every strategy for ``recipe``; the options override its layout.

    Giving ``gpus_per_node`` or ``gpu_memory_gib`` plans for GPUs even for a CPU recipe.
    """
    par = recipe.parallelism
    num_nodes = num_nodes or par.num_nodes
    workers_per_node = gpus_per_node or par.workers_per_node
    on_gpu = par.use_gpu or gpus_per_node is not None or gpu_memory_gib is not None
    capacity = _capacity_bytes(on_gpu, gpu_memory_gib, workers_per_node)
    model = build_meta_model(recipe)
    shape = model_shape(model, quantize_base=recipe.method.kind == "qlora")
    setup = training_setup(recipe, num_nodes * workers_per_node)
    rows = tuple(
        _strategy_fit(recipe, memory.estimate(name, shape, setup, cpu_offload=offload), on_gpu=on_gpu,
                      capacity_bytes=capacity)
        for name, offload in _variants(recipe, on_gpu)
    )
    choice, reason = _choose(rows, capacity, _per(on_gpu))
    return PlanReport(
        model_path=recipe.model.path, method=recipe.method.kind,
        num_params=shape.num_params, num_trainable_params=shape.num_trainable_params,
        device="gpu" if on_gpu else "cpu", num_nodes=num_nodes, workers_per_node=workers_per_node,
        capacity_bytes=capacity, usable_fraction=USABLE_FRACTION, setup=setup,
        rows=rows, choice=choice, reason=reason,
    )


def choose_strategy(recipe: Recipe, report: PlanReport | None = None) -> tuple[str, str]:
    """(strategy, reason) for ``parallelism.strategy: auto`` from the planner's report (made here if not given);
    RecipeError when nothing fits."""
    report = report or plan_report(recipe)
    if report.choice is None:
        raise RecipeError("plan", [Problem("parallelism.strategy", report.reason)])
    return report.choice, report.reason
