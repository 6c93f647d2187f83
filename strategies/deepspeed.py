"""DeepSpeed ZeRO-2 (optimizer state and gradients sharded) and ZeRO-3 (parameters too).

The DeepSpeed config is generated from the plan by ``deepspeed_config``; a
recipe's ``deepspeed_overrides`` are merged on top, but may not change a value
the recipe already decides (that would leave two places saying different
things). The engine runs in DeepSpeed's managed accumulation mode: ``backward``
advances its micro-step counter and ``optimizer_step`` is the accumulation
boundary, so the training loop stays the one every strategy uses.

A checkpoint written at another data-parallel world size is converted once,
by rank 0, into DeepSpeed's universal format under ``<path>/universal`` and
loaded from there: ZeRO's own files are partitioned for the world that wrote
them.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tunefleet.strategies.activation_checkpointing import enable_activation_checkpointing
from tunefleet.strategies.base import (
    OptimizerFactory,
    SchedulerFactory,
    Strategy,
    StrategyPlan,
)

CHECKPOINT_TAG = "deepspeed"  # the folder under a state path that holds DeepSpeed's files
_UNIVERSAL_DIR = "universal"
_ZERO_STAGES = {"deepspeed_zero2": 2, "deepspeed_zero3": 3}

# Config keys whose value follows from the recipe, mapped to the recipe key to change
# instead; None marks a value tunefleet's training loop relies on.
_DECIDED_BY: dict[str, str | None] = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "train_batch_size": "train.micro_batch_size, train.grad_accum_steps and the number of workers",
    "gradient_clipping": "train.max_grad_norm",
    "bf16.enabled": "parallelism.mixed_precision",
    "fp16.enabled": "parallelism.mixed_precision",
    "zero_optimization.stage": "parallelism.strategy",
    "zero_optimization.offload_optimizer.device": "parallelism.cpu_offload",
    "zero_optimization.offload_param.device": "parallelism.cpu_offload",
    "managed_gradient_accumulation": None,
}


def deepspeed_config(plan: StrategyPlan) -> dict[str, Any]:
    """The DeepSpeed config for ``plan``, with ``plan.deepspeed_overrides`` merged on top."""
    stage = _ZERO_STAGES[plan.name]
    zero: dict[str, Any] = {"stage": stage}
    if plan.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": plan.use_gpu}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": plan.use_gpu}
    config = {
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.grad_accum_steps,
        "train_batch_size": plan.global_batch_rows,
        "gradient_clipping": plan.max_grad_norm or 0.0,  # 0 disables clipping
        "bf16": {"enabled": plan.mixed_precision == "bf16"},
        "fp16": {"enabled": plan.mixed_precision == "fp16"},
        "zero_optimization": zero,
        "managed_gradient_accumulation": True,
        # The optimizer is the recipe's torch AdamW, also when its state sits on the CPU.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # the loop logs; keep DeepSpeed quiet
    }
    return merge_overrides(config, plan.deepspeed_overrides)


def merge_overrides(config: dict, overrides: dict) -> dict:
    """``config`` with ``overrides`` merged key by key; ValueError on a decided key."""
    decided = {path: value for path, value in _leaves(config) if path in _DECIDED_BY}
    merged = copy.deepcopy(config)
    for path, value in _leaves(overrides):
        for key, ours in decided.items():
            if (key == path and value != ours) or key.startswith(path + ".") or path.startswith(key + "."):
                raise ValueError(_conflict_message(path, value, key, ours))
        _set(merged, path.split("."), copy.deepcopy(value))
    return merged


def _conflict_message(path: str, value: Any, key: str, ours: Any) -> str:
    clash = f"DeepSpeed override `{path}`={value!r} conflicts with `{key}`={ours!r}"
    source = _DECIDED_BY[key]
    if source is None:
        return f"{clash}, which tunefleet's training loop relies on; remove the override"
    return f"{clash}, which is set from {source}; change {source} instead of overriding it"


def _leaves(tree: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _set(tree: dict, keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        if not isinstance(tree.get(key), dict):
            tree[key] = {}
        tree = tree[key]
    tree[keys[-1]] = value


def saved_world_size(path: str) -> int:
    """Data-parallel ranks that wrote the DeepSpeed checkpoint under ``path`` (0: none there).

    Every ZeRO stage writes one optimizer partition file per data-parallel rank.
    """
    return len(list((Path(path) / CHECKPOINT_TAG).glob("*zero_pp_rank_*_optim_states.pt")))


def convert_to_universal(path: str) -> str:
    """Collective: ``<path>/universal``, converted by rank 0 on first use; every rank waits for it.

    Rank 0 converts into a staging folder and renames it when done, so a crash mid-way
    leaves no half-written universal checkpoint; its error is raised on every rank.
    """
    target = Path(path) / _UNIVERSAL_DIR
    error = None
    if dist.get_rank() == 0 and not target.is_dir():
        staging = Path(path) / f".{_UNIVERSAL_DIR}-partial"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            _ds_to_universal(Path(path) / CHECKPOINT_TAG, staging / CHECKPOINT_TAG)
            staging.rename(target)
        except Exception as exc:  # re-raised below on every rank, not only on rank 0
            error = f"converting {path} to a universal checkpoint failed: {type(exc).__name__}: {exc}"
    outcome = [error]
    dist.broadcast_object_list(outcome, src=0)  # the barrier: the others wait for rank 0 here
    if outcome[0] is not None:
        raise RuntimeError(outcome[0])
    return str(target)


def _ds_to_universal(source: Path, output: Path) -> None:
    from deepspeed.checkpoint import ds_to_universal

    ds_to_universal.main(argparse.Namespace(
        input_folder=str(source), output_folder=str(output),
        # In-process: no worker pools forked from a process that holds a process group.
        num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True,
        # Plain (non-Megatron) engines do not record the universal-checkpoint info it checks for.
        inject_missing_state=True,
    ))


class _DeepSpeedStrategy(Strategy):
    """Shared by both stages: the engine clips, steps optimizer and scheduler, and checkpoints."""

    def __init__(self, plan: StrategyPlan):
        super().__init__(plan)
        self.config = deepspeed_config(plan)

    def setup(
        self,
        module: torch.nn.Module,
        make_optimizer: OptimizerFactory,
        make_scheduler: SchedulerFactory,
        param_groups: list[dict],
    ) -> None:
        import deepspeed

        if self.plan.activation_checkpointing:
            enable_activation_checkpointing(module)
        optimizer = make_optimizer(param_groups)
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            lr_scheduler=make_scheduler(optimizer),
            config=self.config,
        )

    def backward(self, loss: torch.Tensor) -> None:
        # The loop already normalized the loss; DeepSpeed must not divide by accumulation.
        # ZeRO-2/3 reduce-scatter every micro-step into sharded buffers, so the base
        # class's no-op no_sync is right: there is no replicated gradient to hold back.
        self.model.backward(loss, scale_wrt_gas=False)
        if not self.model.is_gradient_accumulation_boundary():
            self.model.step()  # only advances the engine's micro-step counter

    def optimizer_step(self) -> float | None:
        assert self.model.is_gradient_accumulation_boundary(), (
            f"the step had fewer micro-batches than grad_accum_steps={self.plan.grad_accum_steps}"
        )
        self.model.step()  # clips, steps optimizer and scheduler, zeroes gradients
        norm = self.model.get_global_grad_norm()
        return None if norm is None else float(norm)

    def save(self, path: str) -> None:
        self.model.save_checkpoint(path, tag=CHECKPOINT_TAG, save_latest=False)

    def load(self, path: str) -> None:
        saved = saved_world_size(path)
        if saved == 0:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {path}/{CHECKPOINT_TAG}")
        if saved == self.model.dp_world_size:
            self._load_checkpoint(path, universal=False)
        else:
            universal = convert_to_universal(path)
            self._load_checkpoint(universal, universal=True)
            self._repair_universal_load(universal)

    def _load_checkpoint(self, path: str, *, universal: bool) -> None:
        config = self.model._config  # the engine reads the flag on every load; set it for this one
        configured, config.load_universal_checkpoint = config.load_universal_checkpoint, universal
        try:
            load_path, _ = self.model.load_checkpoint(path, tag=CHECKPOINT_TAG)
        finally:
            config.load_universal_checkpoint = configured
        if load_path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {path}/{CHECKPOINT_TAG}")

    def _repair_universal_load(self, path: str) -> None:
        """Undo what DeepSpeed's universal load of this stage gets wrong (nothing by default)."""

    def teardown(self) -> None:
        if self.model is not None:
            self.model.destroy()
        super().teardown()


class DeepSpeedZero2Strategy(_DeepSpeedStrategy):
    name = "deepspeed_zero2"

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        # Every rank holds the full (training-dtype) parameters under ZeRO-2.
        if dist.get_rank() != 0:
            return {}
        return {k: v.detach().cpu().clone() for k, v in self.unwrapped.state_dict().items()}


class DeepSpeedZero3Strategy(_DeepSpeedStrategy):
    name = "deepspeed_zero3"
    shards_parameters = True

    def __init__(self, plan: StrategyPlan):
        super().__init__(plan)
        self._hf_config = None

    @contextlib.contextmanager
    def model_init_context(self) -> Iterator[None]:
        """Make transformers partition parameters while ``from_pretrained`` loads them.

        transformers keeps only a weak reference to this config, and reads it again
        after loading (PEFT, resizing), so the strategy holds it until teardown.
        """
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        # zero.Init reads the world size from DeepSpeed's comm layer: attach it to
        # our process group first, or it partitions for a world of one.
        deepspeed.init_distributed(dist_backend=dist.get_backend())
        self._hf_config = HfDeepSpeedConfig(self.config)
        yield

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        # Gathers one module's partitions at a time; training-dtype (fp32 in fp32 runs).
        state = self.model._zero3_consolidated_16bit_state_dict()
        return state if dist.get_rank() == 0 else {}

    def _repair_universal_load(self, path: str) -> None:
        """DeepSpeed 0.19's ZeRO-3 universal load gives every parameter group the hyperparameters
        of group 0 (weight decay on norms and biases) and one shared ``step`` tensor, which AdamW
        then advances once per group per step (wrong bias correction). Restore both."""
        saved = torch.load(Path(path) / CHECKPOINT_TAG / "zero" / "optimizer_state.pt", weights_only=False)
        optimizer = self.optimizer.optimizer  # torch's, inside DeepSpeed's partitioned wrapper
        for group, saved_group in zip(optimizer.param_groups, saved["param_groups"], strict=True):
            group.update({key: value for key, value in saved_group.items() if key != "params"})
        for state in optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    def teardown(self) -> None:
        from transformers.integrations import unset_hf_deepspeed_config

        super().teardown()
        if self._hf_config is not None:
            unset_hf_deepspeed_config()
            self._hf_config = None
