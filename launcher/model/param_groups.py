"""Which parameters train, at what rate, from which step: ``method.freeze``,
``train.lr_layer_decay``, ``train.head_lr`` and ``train.unfreeze_schedule``.

Patterns are fnmatch patterns (case-sensitive) over names as ``named_parameters``
gives them; a pattern selects a parameter when it matches the parameter's name
or the name of a module that holds it (``model.layers.0`` selects every weight of
layer 0). A pattern that selects nothing is a user error listing real names.

Gradual unfreezing keeps the optimizer's shape fixed: ``param_groups`` puts every
parameter that will ever train into a group from the start, and
``apply_unfreeze`` only flips ``requires_grad``. A frozen parameter gets no
gradient, and AdamW skips parameters whose ``grad`` is None entirely (no update,
no weight decay, no state), so it never changes; at its unfreeze step its Adam
state starts at step 1, exactly as for a parameter that was trainable from the
start. Checkpoints therefore hold the same groups at every step, and a resume that
calls ``apply_unfreeze`` before loading restores the run exactly.

Strategies: groups of scheduled parameters carry ``UNFREEZE_STEP``, on which the
ddp strategy turns on ``find_unused_parameters`` (its reducer otherwise waits for
the frozen parameters' gradients and fails); fsdp needs nothing. DeepSpeed ZeRO
kept stepping scheduled parameters before their step, so ``strategies.compat``
rejects the schedule there.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

import torch

from tunefleet.launcher.config import TrainConfig, UnfreezeStep
from tunefleet.launcher.errors import Problem, RecipeError
from tunefleet.strategies.base import UNFREEZE_STEP

_SCHEDULE_ATTR = "tunefleet_unfreeze_steps"  # on the model: parameter name -> first step it trains
_NUM_EXAMPLES = 8  # real names quoted when a pattern matches nothing
_PEFT_PREFIX = "base_model.model."
# Names transformers' loader reports for newly initialised weights are those of the bare model;
# peft wraps a trained head as `<head>.modules_to_save.<adapter>.<param>`.
_SAVED_COPY = ".modules_to_save.default."


def matches(name: str, pattern: str) -> bool:
    """``pattern`` matches the parameter ``name`` or one of the modules that hold it."""
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:end]), pattern) for end in range(len(parts), 0, -1))


def select(names: Iterable[str], patterns: Sequence[str], key: str) -> set[str]:
    """The names any pattern matches; RecipeError naming ``key`` if one pattern matches none."""
    names = list(names)
    chosen: set[str] = set()
    problems = []
    for i, pattern in enumerate(patterns):
        hits = {name for name in names if matches(name, pattern)}
        if not hits:
            problems.append(Problem(f"{key}.{i}", f"{pattern!r} matches no parameter; module names look like "
                                    f"{', '.join(example_modules(names))}"))
        chosen |= hits
    if problems:
        raise RecipeError("recipe", problems)
    return chosen


def example_modules(names: Sequence[str]) -> list[str]:
    """A few module names spread over the model, cut after the layer index (``model.layers.3``)."""
    modules = []
    for name in names:
        parts = name.split(".")[:-1]
        index = next((i for i, part in enumerate(parts) if part.isdigit()), len(parts) - 1)
        modules.append(".".join(parts[: index + 1]))
    modules = list(dict.fromkeys(modules))
    if len(modules) <= _NUM_EXAMPLES:
        return modules
    stride = (len(modules) - 1) / (_NUM_EXAMPLES - 1)
    return [modules[round(i * stride)] for i in range(_NUM_EXAMPLES)]


def freeze(model: torch.nn.Module, patterns: Sequence[str]) -> None:
    """``method.freeze``: these parameters never train."""
    named = dict(model.named_parameters())
    for name in select(named, patterns, "method.freeze"):
        named[name].requires_grad_(False)


def apply_unfreeze(model: torch.nn.Module, step: int) -> None:
    """Make the parameters ``train.unfreeze_schedule`` names trainable from their step on, frozen before.

    ``param_groups(model, train)`` must have run on this model (it records the schedule). Call it on
    the unwrapped model before every optimizer step with ``step`` = the steps done so far (0 first),
    and once before loading a checkpoint written after ``done`` steps with ``step = done - 1``, so
    that the optimizer state a loader initialises covers exactly the parameters that had trained.
    Without a schedule it does nothing.
    """
    starts = getattr(model, _SCHEDULE_ATTR, None)
    if not starts:
        return
    for name, param in model.named_parameters():
        if name in starts:
            param.requires_grad_(step >= starts[name])


def unfreeze_steps(names: Iterable[str], schedule: Sequence[UnfreezeStep]) -> dict[str, int]:
    """The step each parameter first trains at (0: from the start); a parameter several entries
    name trains from the latest of their steps."""
    starts = dict.fromkeys(names, 0)
    for i, entry in enumerate(schedule):
        for name in select(starts, entry.modules, f"train.unfreeze_schedule.{i}.modules"):
            starts[name] = max(starts[name], entry.step)
    return starts


def param_groups(model: torch.nn.Module, train: TrainConfig) -> list[dict]:
    """AdamW groups over every parameter that trains now or after unfreezing.

    Weight decay on matrices, none on biases and norms. Each group carries its own
    peak ``lr`` (``train.lr``, or the layer-decayed or head rate), which the
    scheduler scales; groups of scheduled parameters also carry ``UNFREEZE_STEP``.
    Records the schedule on ``model`` for ``apply_unfreeze``; call it before
    ``apply_unfreeze`` freezes anything.
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    names = [name for name, _ in named]
    starts = unfreeze_steps(names, train.unfreeze_schedule)
    setattr(model, _SCHEDULE_ATTR, {name: start for name, start in starts.items() if start})
    rates = learning_rates(model, names, train)
    # Keyed by (rate, decays) rather than the decay value, so that with one rate the groups are
    # [decay, no decay] even at weight_decay 0, as checkpoints written before per-group rates hold.
    groups: dict[tuple[float, bool, int], list[torch.nn.Parameter]] = {}
    for name, param in named:
        # ZeRO-3 partitions parameters at load: their real shape is in ds_shape.
        ndim = len(getattr(param, "ds_shape", param.shape))
        groups.setdefault((rates[name], ndim >= 2 and "norm" not in name.lower(), starts[name]), []).append(param)
    return [{"params": params, "lr": lr, "weight_decay": train.weight_decay if decays else 0.0,
             **({UNFREEZE_STEP: start} if start else {})}
            for (lr, decays, start), params in groups.items()]


def learning_rates(model: torch.nn.Module, names: Sequence[str], train: TrainConfig) -> dict[str, float]:
    """Each trainable parameter's peak rate."""
    rates = dict.fromkeys(names, train.lr)
    if train.lr_layer_decay is not None:
        rates.update(_layer_decayed(model, names, train.lr, train.lr_layer_decay))
    if train.head_lr is not None:
        new = getattr(model, "tunefleet_new_weights", frozenset())
        heads = [name for name in names if base_name(name) in new]
        if not heads:
            raise RecipeError("recipe", [Problem("train.head_lr", "the model has no trainable newly initialised "
                                                 "weights (the model folder holds all of them); remove it")])
        rates.update(dict.fromkeys(heads, train.head_lr))
    return rates


def _layer_decayed(model: torch.nn.Module, names: Sequence[str], lr: float, decay: float) -> dict[str, float]:
    stack_name, num_layers = _layer_stack(model)
    embeddings = _embedding_names(model)
    rates = {}
    for name in names:
        rest = name.removeprefix(stack_name + ".") if stack_name else name
        if rest != name and rest.split(".", 1)[0].isdigit():
            rates[name] = lr * decay ** (num_layers - 1 - int(rest.split(".", 1)[0]))
        elif name in embeddings:
            rates[name] = lr * decay**num_layers
    return rates


def _layer_stack(model: torch.nn.Module) -> tuple[str, int]:
    """The decoder/encoder layers: the longest ModuleList (``model.layers``, ``encoder.layer``)."""
    lists = [(name, len(module)) for name, module in model.named_modules() if isinstance(module, torch.nn.ModuleList)]
    if not lists:
        raise RecipeError("recipe", [Problem("train.lr_layer_decay", f"found no layer stack (a ModuleList) in "
                                             f"{type(model).__name__}; remove it")])
    return max(lists, key=lambda item: item[1])


def _embedding_names(model: torch.nn.Module) -> set[str]:
    """Input embeddings (and, by name, position/type embeddings and their norm)."""
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    ids = {id(p) for p in inputs.parameters()} if inputs is not None else set()
    return {name for name, p in model.named_parameters()
            if id(p) in ids or any("embed" in part for part in name.split(".")[:-1])}


def base_name(name: str) -> str:
    """A parameter's name in the bare transformers model (peft wrapping undone)."""
    return name.removeprefix(_PEFT_PREFIX).replace(_SAVED_COPY, ".")
