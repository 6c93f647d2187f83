"""The per-worker training loop. Runs inside a Ray Train worker with the
process group already up; reads top to bottom, like a single-file recipe."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from tunefleet.launcher import data, dpo, generation, modeling, reward, throughput
from tunefleet.launcher.checkpoint import CheckpointManager, latest, read_meta
from tunefleet.launcher.control import StopPoller
from tunefleet.launcher.metrics import Reporter
from tunefleet.launcher.plan import rebalance
from tunefleet.launcher.preflight import run_preflight
from tunefleet.launcher.recipe import Recipe
from tunefleet.launcher.steps import evaluate, evaluate_classifier, train_step
from tunefleet.strategies import base as strategies
from tunefleet.strategies.base import StrategyPlan


@dataclass(frozen=True)
class Job:
    """What the driver resolved before workers start (shipped to every worker)."""

    recipe: Recipe
    strategy_plan: StrategyPlan
    model_path: str
    data_dir: str
    wandb_run_id: str
    launch_id: str = ""
    attachments: dict = field(default_factory=dict)  # e.g. the planner's report, for the W&B run
    driver_versions: dict = field(default_factory=dict)
    host_bytes_needed: int = 0
    fault: dict = field(default_factory=dict)  # test-only fault injection, see faults.py


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(job: Job, reporter: Reporter, control=None, node: str | None = None) -> dict:
    recipe = job.recipe
    rank, world_size = dist.get_rank(), dist.get_world_size()
    plan = rebalance(job.strategy_plan, world_size=world_size)
    device = torch.device("cuda", torch.cuda.current_device()) if plan.use_gpu else torch.device("cpu")
    seed_everything(recipe.train.seed)

    # Preflight: fail in seconds, naming the node, before anything heavy happens.
    problems, preflight = run_preflight(
        driver_versions=job.driver_versions, checkpoint_dir=recipe.checkpoint_dir,
        host_bytes_needed=job.host_bytes_needed, device=device, node=node,
    )
    if problems:
        return {"preflight_failed": problems, "preflight": preflight}

    # Model, strategy, optimizer.
    strategy = strategies.create(plan)
    tokenizer = modeling.load_tokenizer(job.model_path)
    module = modeling.load_model(
        recipe.model, recipe.method, job.model_path, init_context=strategy.model_init_context()
    )
    strategy.setup(
        module,
        modeling.make_optimizer_factory(recipe.train),
        modeling.make_scheduler_factory(recipe.train),
        modeling.param_groups(module, recipe.train),
    )

    num_params = sum(getattr(p, "ds_numel", p.numel()) for p in strategy.unwrapped.parameters())
    num_trainable = sum(getattr(p, "ds_numel", p.numel()) for p in strategy.unwrapped.parameters() if p.requires_grad)
    peak_flops = throughput.device_peak_flops(device)
    model_config = getattr(strategy.unwrapped, "config", None)

    # Data: memory-mapped token arrays prepared once by the driver.
    train_split = data.open_split(Path(job.data_dir), "train")
    eval_split = data.open_split(Path(job.data_dir), "eval")
    pad_id = tokenizer.pad_token_id
    eval_set = (
        data.eval_batches(eval_split, rank=rank, world_size=world_size, batch_size=plan.micro_batch_size,
                          max_rows=recipe.data.eval.max_rows, pad_id=pad_id)
        if eval_split is not None else None
    )

    step_fn, evaluate_fn = objective(recipe, job.model_path, device)
    # Beyond the objective's figures: greedy generations matched with references, and the forgetting watch.
    generate = recipe.data.eval.generate if eval_set is not None else None
    prompts = (generation.rank_prompts(eval_split, tokenizer, max_prompts=generate.max_prompts, rank=rank,
                                       world_size=world_size) if generate is not None else None)
    reference_split = data.open_split(Path(job.data_dir), "reference")
    reference_set = (
        data.eval_batches(reference_split, rank=rank, world_size=world_size, batch_size=plan.micro_batch_size,
                          max_rows=None, pad_id=pad_id)
        if reference_split is not None else None
    )
    reference_start = None  # reference perplexity before training; a resume reads it from the checkpoint

    # Resume from the newest complete checkpoint, if any.
    checkpoints = CheckpointManager(
        recipe.checkpoint_dir, recipe.checkpoint.keep_last, async_save=recipe.checkpoint.async_save
    )
    start_step, tokens_seen, wandb_run_id = 0, 0, job.wandb_run_id
    if (resume_from := latest(recipe.checkpoint_dir)) is not None:
        # Trainable as at the checkpoint, so the loader restores optimizer state for exactly those parameters.
        modeling.apply_unfreeze(strategy.unwrapped, read_meta(resume_from)["step"] - 1)
        meta = checkpoints.load(resume_from, strategy)
        start_step, tokens_seen = meta["step"], meta["tokens_seen"]
        wandb_run_id = meta.get("wandb_run_id", wandb_run_id)
        reference_start = meta.get("reference_perplexity_start")
    restarts = count_attempt(recipe.output_dir, job.launch_id, rank) - 1
    reporter.start(start_step=start_step, resumed_from=resume_from,
                   attachments={"preflight": preflight, "plan": plan.model_dump(mode="json"), **job.attachments})

    def save_checkpoint(step: int) -> None:
        started = time.perf_counter()
        checkpoints.save(step, strategy, {
            "tokens_seen": tokens_seen, "world_size": world_size, "wandb_run_id": wandb_run_id,
            "recipe_fingerprint": recipe.fingerprint(), "strategy": plan.name,
            "global_batch_rows": plan.global_batch_rows, "reference_perplexity_start": reference_start,
        }, before_commit=lambda: inject_fault(job, rank, step, "checkpoint"))
        reporter.log({"step": step, "checkpoint_stall_s": time.perf_counter() - started})

    def run_evaluation(step: int) -> None:
        nonlocal reference_start
        row = {"step": step, **evaluate_fn(strategy, eval_set, device)}
        if prompts is not None:
            row |= generation.evaluate_generation(strategy, prompts, tokenizer, batch_size=plan.micro_batch_size,
                                                  max_new_tokens=generate.max_new_tokens, device=device)
        if reference_set is not None:
            perplexity = math.exp(evaluate(strategy, reference_set, device))
            reference_start = perplexity if reference_start is None else reference_start
            row |= {"reference_perplexity": perplexity, "reference_perplexity_change": perplexity - reference_start}
        reporter.log(row)

    if eval_set is not None and start_step == 0:
        run_evaluation(0)

    # The loop.
    every_eval, every_ckpt = recipe.train.eval_every_steps, recipe.checkpoint.every_steps
    stop = StopPoller(control, rank)
    for step in range(start_step, recipe.train.max_steps):
        micro_batches = data.rank_micro_batches(
            train_split, step, rank=rank, world_size=world_size,
            micro_batch_size=plan.micro_batch_size, grad_accum_steps=plan.grad_accum_steps,
            seed=recipe.train.seed, pad_id=pad_id,
        )
        modeling.apply_unfreeze(strategy.unwrapped, step)  # train.unfreeze_schedule; no-op without one
        inject_fault(job, rank, step, "step")
        started = time.perf_counter()
        result = step_fn(strategy, micro_batches, device)
        step_time_s = time.perf_counter() - started
        tokens_seen += result.num_input_tokens
        done = step + 1
        if done % recipe.logging.every_steps == 0 or done == recipe.train.max_steps:
            rows = plan.global_batch_rows
            flops = throughput.flops_per_token(
                model_config, num_params, num_trainable, seq_len=result.num_input_tokens // rows
            ) * result.num_input_tokens
            reporter.log({
                "step": done, "loss": result.loss, "lr": strategy.scheduler.get_last_lr()[0],
                "grad_norm": result.grad_norm, "tokens_per_s": result.num_input_tokens / step_time_s,
                "tokens_per_s_per_worker": result.num_input_tokens / step_time_s / world_size,
                "samples_per_s": rows / step_time_s, "step_time_s": step_time_s, "tokens_seen": tokens_seen,
                "mfu": flops / step_time_s / (peak_flops * world_size) if peak_flops else None,
                "packing_efficiency": batch_fill(micro_batches), "restarts": restarts,
                **result.metrics(), **memory_per_rank(strategy, device),
            })
        if eval_set is not None and every_eval and done % every_eval == 0 and done != recipe.train.max_steps:
            run_evaluation(done)
        saved = every_ckpt and done % every_ckpt == 0 and done != recipe.train.max_steps
        if saved:
            save_checkpoint(done)
        if done != recipe.train.max_steps and stop.agreed():
            if not saved:
                save_checkpoint(done)
            checkpoints.wait()
            strategy.teardown()
            return {"preempted_at": done, "reason": stop.reason, "preflight": preflight}

    # The end: final eval, a last checkpoint, and the exported model.
    final_step = recipe.train.max_steps
    if eval_set is not None and start_step < final_step:
        run_evaluation(final_step)
    if every_ckpt and start_step < final_step:
        save_checkpoint(final_step)
    checkpoints.wait()
    final_dir = Path(recipe.output_dir) / "final"
    if recipe.checkpoint.export_final:
        state = strategy.full_state_dict()
        if rank == 0:
            modeling.save_final(strategy.unwrapped, state, tokenizer, final_dir)
        dist.barrier()
    strategy.teardown()
    return {"final_dir": str(final_dir) if recipe.checkpoint.export_final else None, "preflight": preflight}


def objective(recipe: Recipe, model_path: str, device: torch.device):
    """(step, evaluation) for the recipe: the token loss; the classifier loss with accuracy and macro F1;
    a reward model's pairwise loss with reward accuracy; or DPO against a frozen reference (LoRA: the
    policy with adapters disabled; full: a copy of the starting weights)."""
    if recipe.method.objective == "reward":
        return reward.reward_step, reward.reward_evaluate
    if recipe.model.task == "sequence_classification":
        labels = recipe.model.num_labels
        return train_step, lambda strategy, batches, device: evaluate_classifier(strategy, batches, device, labels)
    if recipe.method.objective != "dpo":
        return train_step, lambda strategy, batches, device: {"eval_loss": evaluate(strategy, batches, device)}
    reference, beta = dpo.load_reference(recipe, model_path, device), recipe.method.beta
    return (
        lambda strategy, batches, device: dpo.dpo_step(strategy, reference, batches, device, beta=beta),
        lambda strategy, batches, device: dpo.dpo_evaluate(strategy, reference, batches, device, beta=beta),
    )


def batch_fill(micro_batches: list[dict[str, torch.Tensor]]) -> float:
    """This rank's share of non-pad token slots in the step's batches (packing efficiency as trained)."""
    real = sum(int(mb["attention_mask"].sum()) for mb in micro_batches)
    return real / max(sum(mb["attention_mask"].numel() for mb in micro_batches), 1)


def memory_per_rank(strategy, device: torch.device) -> dict[str, list[int]]:
    """Collective: held tensor bytes (params, grads, optimizer state) and RSS of every rank."""
    stats = {"held_bytes": sum(throughput.held_bytes(strategy).values()),
             **throughput.memory_stats(device)}
    mine = torch.tensor(list(stats.values()), dtype=torch.int64)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return {f"{name}_per_rank": [int(g[i]) for g in gathered] for i, name in enumerate(stats)}


def count_attempt(output_dir: str, launch_id: str, rank: int) -> int:
    """Rank 0 records each start of the worker group; returns this launch's attempt number."""
    attempts = Path(output_dir) / ".attempts"
    if rank == 0:
        attempts.parent.mkdir(parents=True, exist_ok=True)
        with attempts.open("a") as handle:
            handle.write(launch_id + "\n")
    dist.barrier()
    return attempts.read_text().split().count(launch_id) if attempts.is_file() else 1


def inject_fault(job: Job, rank: int, step: int, at: str) -> None:
    """Test hook: act on a fault planned for (rank, step, place); no-op in normal runs."""
    if job.fault:
        from tunefleet.launcher.faults import maybe_inject

        maybe_inject(job.fault, rank=rank, step=step, at=at, output_dir=job.recipe.output_dir)

