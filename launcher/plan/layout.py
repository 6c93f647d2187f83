"""Recipe -> one validated, frozen plan before any process starts.

The plan fixes the strategy (``auto`` resolved by the memory planner), the
worker layout and the batch arithmetic; checks here reject a layout that
cannot work and name the recipe key to change.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tunefleet.launcher.config import Recipe
from tunefleet.launcher.errors import Problem, RecipeError, UserError
from tunefleet.launcher.plan import memory_fit
from tunefleet.launcher.plan.memory_fit import PlanReport
from tunefleet.strategies.base import StrategyPlan
from tunefleet.strategies.compat import check_compatibility


def layout_problems(recipe: Recipe, *, available_gpus: int | None = None) -> list[Problem]:
    """Problems with the worker layout that no process needs to start to see."""
    par = recipe.parallelism
    problems = []
    if par.use_gpu and available_gpus is not None and par.num_nodes == 1 and par.workers_per_node > available_gpus:
        problems.append(Problem("parallelism.workers_per_node",
                                f"{par.workers_per_node} workers need {par.workers_per_node} GPUs, this machine has "
                                f"{available_gpus}; lower it or set parallelism.num_nodes"))
    if par.use_gpu and available_gpus == 0 and recipe.cluster.address is None:
        problems.append(Problem("parallelism.use_gpu", "no GPU found on this machine; set it to false to train on CPU"))
    return problems


def strategy_plan(recipe: Recipe, strategy: str) -> StrategyPlan:
    par, train = recipe.parallelism, recipe.train
    return StrategyPlan(
        name=strategy,
        world_size=par.world_size,
        num_nodes=par.num_nodes,
        workers_per_node=par.workers_per_node,
        use_gpu=par.use_gpu,
        micro_batch_size=train.micro_batch_size,
        grad_accum_steps=train.grad_accum_steps,
        mixed_precision=par.mixed_precision,
        activation_checkpointing=par.activation_checkpointing,
        compile=par.compile,
        cpu_offload=par.cpu_offload,
        max_grad_norm=train.max_grad_norm,
    )


@dataclass(frozen=True)
class LaunchPlan:
    """A recipe's frozen plan: the strategy's layout and batch arithmetic, why that strategy, and the memory
    planner's report when the choice asked for it (``strategy: auto``), so a launch never plans twice."""

    strategy: StrategyPlan
    reason: str
    memory: PlanReport | None = None

    def memory_report(self, recipe: Recipe) -> PlanReport:
        """The planner's report for this plan: the one the choice made, else made now."""
        return self.memory or memory_fit.plan_report(recipe)


def resolve_strategy(recipe: Recipe) -> tuple[str, str, PlanReport | None]:
    """(strategy name, reason, the planner's report if it was asked); `auto` asks the memory planner."""
    if recipe.parallelism.strategy != "auto":
        return recipe.parallelism.strategy, "set by parallelism.strategy", None
    report = memory_fit.plan_report(recipe)
    return *memory_fit.choose_strategy(recipe, report), report


def make_plan(recipe: Recipe, source: str = "recipe", *, on_this_machine: bool = False) -> LaunchPlan:
    """The frozen plan for a recipe and why its strategy was chosen; RecipeError lists all problems.

    ``on_this_machine``: the workers will run here (an embedded Ray), so this machine's GPUs must
    suffice; `validate` and `submit` (say, on a login node without GPUs) do not check them.
    """
    problems = layout_problems(recipe, available_gpus=_local_gpus() if on_this_machine else None)
    name, reason, report = resolve_strategy(recipe)
    par = recipe.parallelism
    for message in check_compatibility(
        name, recipe.method.kind, use_gpu=par.use_gpu, cpu_offload=par.cpu_offload,
        mixed_precision=par.mixed_precision, unfreeze_schedule=bool(recipe.train.unfreeze_schedule),
    ):
        problems.append(Problem("parallelism.strategy" if "strategy" in message else "method.kind", message))
    if recipe.checkpoint.async_save and name.startswith("deepspeed"):
        problems.append(Problem("checkpoint.async", f"{name} writes DeepSpeed's own checkpoints, which have no "
                                "background mode; set checkpoint.async: false, or use strategy ddp or fsdp"))
    if par.compile and name.startswith("deepspeed"):
        problems.append(Problem("parallelism.compile", f"{name} runs the model inside DeepSpeed's engine, which "
                                "tunefleet does not compile; set parallelism.compile: false, or use strategy ddp or "
                                "fsdp"))
    method = recipe.method
    needs_copy = method.objective == "dpo" or (method.online_rl and method.rl.kl_coef > 0)
    if needs_copy and method.kind == "full" and name == "deepspeed_zero3":
        # Full fine-tuning keeps a frozen reference copy outside the engine; while ZeRO-3's config is
        # alive, transformers builds every model partitioned, which a module outside the engine cannot run.
        fix = "method.rl.kl_coef: 0 (no reference), " if method.online_rl else ""
        problems.append(Problem("parallelism.strategy", f"method.objective {method.objective} with method.kind "
                                "full needs an unsharded reference copy, which deepspeed_zero3 cannot build; use "
                                f"strategy fsdp or deepspeed_zero2, {fix}or method.kind lora (its reference is the "
                                "base itself)"))
    if method.online_rl and name == "deepspeed_zero3" and any(r.model for r in method.rl.reward):
        problems.append(Problem("parallelism.strategy", "method.rl.reward: a reward model runs beside the policy, "
                                "unsharded, which deepspeed_zero3 cannot build while its config is alive; use "
                                "strategy fsdp or deepspeed_zero2"))
    if problems:
        raise RecipeError(source, problems)
    return LaunchPlan(strategy_plan(recipe, name), reason, report)


def _local_gpus() -> int:
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        return 0
    import torch

    return torch.cuda.device_count()


def rebalance(plan: StrategyPlan, *, world_size: int, global_rows: int | None = None) -> StrategyPlan:
    """The plan on ``world_size`` workers with the same global batch (accumulation adjusted).

    Used when Ray gives fewer workers after a node loss (``parallelism.min_workers``) and when a
    checkpoint written at another world size is resumed.
    """
    global_rows = global_rows or plan.global_batch_rows
    if world_size == plan.world_size and global_rows == plan.global_batch_rows:
        return plan
    per_rank, remainder = divmod(global_rows, world_size)
    if remainder or per_rank % plan.micro_batch_size:
        raise UserError(
            f"the global batch of {global_rows} rows cannot be split over {world_size} workers with "
            f"train.micro_batch_size {plan.micro_batch_size}; change parallelism.min_workers, "
            "parallelism.workers_per_node or train.micro_batch_size"
        )
    return plan.model_copy(update={"world_size": world_size, "grad_accum_steps": per_rank // plan.micro_batch_size})
