"""The per-worker training loop. Runs inside a Ray Train worker with the
process group already up; reads top to bottom, like a single-file recipe."""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from tunefleet.launcher import collectives
from tunefleet.launcher.config.recipe import Recipe
from tunefleet.launcher.data import batches
from tunefleet.launcher.evaluation.best_metric import META_KEY as BEST_KEY
from tunefleet.launcher.evaluation.best_metric import BestMetric
from tunefleet.launcher.evaluation.evaluate import evaluate_all, objective, open_eval_inputs
from tunefleet.launcher.model import modeling
from tunefleet.launcher.plan.layout import rebalance
from tunefleet.launcher.training import throughput
from tunefleet.launcher.training.checkpoint import CheckpointManager, latest, read_meta
from tunefleet.launcher.training.control import StopPoller
from tunefleet.launcher.training.metrics import Reporter
from tunefleet.launcher.training.preflight import run_preflight
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


def worker_device(plan: StrategyPlan) -> torch.device:
    """The device this rank trains (and evaluates) on: its GPU, or the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if plan.use_gpu else torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(job: Job, reporter: Reporter, control=None, node: str | None = None) -> dict:
    recipe = job.recipe
    startup = {"worker_start": time.time()}  # wall clock of each start-up phase; rank 0 writes STARTUP_FILE
    rank, world_size = dist.get_rank(), dist.get_world_size()
    plan = rebalance(job.strategy_plan, world_size=world_size)
    device = worker_device(plan)
    seed_everything(recipe.train.seed)

    # Preflight: fail in seconds, naming the node, before anything heavy happens.
    problems, preflight = run_preflight(
        driver_versions=job.driver_versions, checkpoint_dir=recipe.checkpoint_dir,
        host_bytes_needed=job.host_bytes_needed, device=device, node=node,
    )
    if problems:
        return {"preflight_failed": problems, "preflight": preflight}

    # Model, strategy, optimizer.
    startup["preflight_done"] = time.time()
    strategy = strategies.create(plan)
    tokenizer = modeling.load_tokenizer(job.model_path)
    module = modeling.load_model(
        recipe.model, recipe.method, job.model_path, init_context=strategy.model_init_context()
    )
    startup["model_loaded"] = time.time()
    strategy.setup(
        module,
        modeling.make_optimizer_factory(recipe.train),
        modeling.make_scheduler_factory(recipe.train),
        modeling.param_groups(module, recipe.train),
    )

    startup["strategy_ready"] = time.time()
    num_params = sum(getattr(p, "ds_numel", p.numel()) for p in strategy.unwrapped.parameters())
    num_trainable = sum(getattr(p, "ds_numel", p.numel()) for p in strategy.unwrapped.parameters() if p.requires_grad)
    peak_flops = throughput.device_peak(device, plan.mixed_precision)
    if rank == 0:
        throughput.record_peak(recipe.output_dir, peak_flops)
    model_config = getattr(strategy.unwrapped, "config", None)

    # Data: memory-mapped token arrays prepared once by the driver.
    train_split = batches.open_split(Path(job.data_dir), "train")
    pad_id = tokenizer.pad_token_id
    # The objective's figures, greedy generations matched with references, and the forgetting watch.
    eval_set = open_eval_inputs(recipe, job.data_dir, tokenizer, rank=rank, world_size=world_size,
                                batch_size=plan.micro_batch_size)
    step_fn, evaluate_fn = objective(recipe, job.model_path, device)
    reference_start = None  # reference perplexity before training; a resume reads it from the checkpoint
    best = BestMetric.for_recipe(recipe)  # checkpoint.keep_best, early stopping; None without either
    stopped_early_at = None

    # Resume from the newest complete checkpoint, if any.
    checkpoints = CheckpointManager(recipe.checkpoint_dir, recipe.checkpoint.keep_last,
                                    async_save=recipe.checkpoint.async_save, keep_best=recipe.checkpoint.keep_best)
    start_step, tokens_seen, wandb_run_id = 0, 0, job.wandb_run_id
    if (resume_from := latest(recipe.checkpoint_dir)) is not None:
        # Trainable as at the checkpoint, so the loader restores optimizer state for exactly those parameters.
        modeling.apply_unfreeze(strategy.unwrapped, read_meta(resume_from)["step"] - 1)
        meta = checkpoints.load(resume_from, strategy)
        start_step, tokens_seen = meta["step"], meta["tokens_seen"]
        wandb_run_id = meta.get("wandb_run_id", wandb_run_id)
        reference_start = meta.get("reference_perplexity_start")
        stopped_early_at = meta.get("stopped_early_at")  # a stopped run stays stopped
        if best is not None:
            best.restore(meta.get(BEST_KEY))
    restarts = count_attempt(recipe.output_dir, job.launch_id, rank) - 1
    reporter.start(start_step=start_step, resumed_from=resume_from,
                   attachments={"preflight": preflight, "plan": plan.model_dump(mode="json"), **job.attachments})

    def save_checkpoint(step: int) -> None:
        started = time.perf_counter()
        checkpoints.save(step, strategy, {
            "tokens_seen": tokens_seen, "world_size": world_size, "wandb_run_id": wandb_run_id,
            "recipe_fingerprint": recipe.fingerprint(), "strategy": plan.name,
            "global_batch_rows": plan.global_batch_rows, "reference_perplexity_start": reference_start,
            BEST_KEY: best.state() if best is not None else None, "stopped_early_at": stopped_early_at,
        }, before_commit=lambda: inject_fault(job, rank, step, "checkpoint"))
        reporter.log({"step": step, "checkpoint_stall_s": time.perf_counter() - started})

    def run_evaluation(step: int) -> bool:
        """Evaluate and log; True when it is a new best that `checkpoint.keep_best` keeps."""
        nonlocal reference_start
        row = evaluate_all(strategy, eval_set, evaluate_fn, recipe, tokenizer, batch_size=plan.micro_batch_size,
                           device=device)
        if "reference_perplexity" in row:
            reference_start = row["reference_perplexity"] if reference_start is None else reference_start
            row["reference_perplexity_change"] = row["reference_perplexity"] - reference_start
        improved = best is not None and best.update(step, agreed(row[best.metric], device))
        if best is not None and best.step is not None:
            row |= {"best_metric": best.value, "best_step": best.step}
        reporter.log({"step": step, **row})
        return improved and recipe.checkpoint.keep_best

    if eval_set is not None and start_step == 0:
        run_evaluation(0)

    # The loop.
    every_eval, every_ckpt = recipe.train.eval_every_steps, recipe.checkpoint.every_steps
    stop = StopPoller(control, rank)
    last_step = recipe.train.max_steps if stopped_early_at is None else start_step  # resuming a stopped run: done
    for step in range(start_step, last_step):
        micro_batches = batches.rank_micro_batches(
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
        if step == start_step and rank == 0:
            record_startup(recipe.output_dir, {**startup, "first_step_done": time.time()})
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
                "mfu": throughput.mfu(flops, step_time_s, peak_flops, world_size),
                "packing_efficiency": batch_fill(micro_batches), "restarts": restarts,
                **result.metrics(), **memory_per_rank(strategy, device),
            })
        new_best = False
        if eval_set is not None and every_eval and done % every_eval == 0 and done != recipe.train.max_steps:
            new_best = run_evaluation(done)
        if best is not None and best.should_stop and done != recipe.train.max_steps:
            stopped_early_at = done  # on every rank: they all followed rank 0's figure (`agreed`)
        periodic = every_ckpt and done % every_ckpt == 0
        saved = (periodic or new_best or stopped_early_at is not None) and done != recipe.train.max_steps
        if saved:
            save_checkpoint(done)
        if stopped_early_at is not None:
            break
        if done != recipe.train.max_steps and stop.agreed():
            if not saved:
                save_checkpoint(done)
            checkpoints.wait()
            strategy.teardown()
            return {"preempted_at": done, "reason": stop.reason, "preflight": preflight}

    # The end (unless stopped early): final eval, a last checkpoint, and the exported model.
    final_step = recipe.train.max_steps
    if stopped_early_at is None and start_step < final_step:
        new_best = run_evaluation(final_step) if eval_set is not None else False
        if every_ckpt or new_best:
            save_checkpoint(final_step)
    checkpoints.wait()
    final_dir = Path(recipe.output_dir) / "final"
    exported_step = stopped_early_at or final_step
    if recipe.checkpoint.export_final:
        if recipe.checkpoint.final_from == "best" and best.step is not None and best.step != exported_step:
            exported_step = load_best(checkpoints, strategy, best.step)
        state = strategy.full_state_dict()
        if rank == 0:
            modeling.save_final(strategy.unwrapped, state, tokenizer, final_dir)
        collectives.barrier()
    strategy.teardown()
    return {"final_dir": str(final_dir) if recipe.checkpoint.export_final else None, "preflight": preflight,
            "final_step": exported_step if recipe.checkpoint.export_final else None,
            "stopped_early_at": stopped_early_at, **({"best": best.state()} if best is not None else {})}


def agreed(value: float, device: torch.device) -> float:
    """Rank 0's ``value`` on every rank, so that every rank takes the same best/stop decisions."""
    return float(collectives.broadcast(torch.tensor([value], dtype=torch.float64, device=device)).item())


def load_best(checkpoints: CheckpointManager, strategy, step: int) -> int:
    """Collective: put the best checkpoint's weights into the strategy (`checkpoint.final_from: best`)."""
    path = checkpoints.root / f"step_{step}"
    if not path.is_dir():
        raise RuntimeError(f"the best checkpoint {path} is gone; export another one with `tunefleet export`")
    modeling.apply_unfreeze(strategy.unwrapped, step - 1)  # trainable as at that step, as a resume does
    checkpoints.load(path, strategy)
    return step


def batch_fill(micro_batches: list[dict[str, torch.Tensor]]) -> float:
    """This rank's share of non-pad token slots in the step's batches (packing efficiency as trained)."""
    real = sum(int(mb["attention_mask"].sum()) for mb in micro_batches)
    return real / max(sum(mb["attention_mask"].numel() for mb in micro_batches), 1)


def memory_per_rank(strategy, device: torch.device) -> dict[str, list[int]]:
    """Collective: held tensor bytes (params, grads, optimizer state) and RSS of every rank."""
    stats = {"held_bytes": sum(throughput.held_bytes(strategy).values()),
             **throughput.memory_stats(device)}
    gathered = collectives.all_gather(torch.tensor(list(stats.values()), dtype=torch.int64))
    return {f"{name}_per_rank": [int(g[i]) for g in gathered] for i, name in enumerate(stats)}


STARTUP_FILE = "startup.json"


def record_startup(output_dir: str, phases: dict[str, float]) -> None:
    """Rank 0: when (wall clock) each start-up phase of this attempt ended, for the launch summary."""
    (Path(output_dir) / STARTUP_FILE).write_text(json.dumps(phases))


def count_attempt(output_dir: str, launch_id: str, rank: int) -> int:
    """Rank 0 records each start of the worker group; returns this launch's attempt number."""
    attempts = Path(output_dir) / ".attempts"
    if rank == 0:
        attempts.parent.mkdir(parents=True, exist_ok=True)
        with attempts.open("a") as handle:
            handle.write(launch_id + "\n")
    collectives.barrier()
    return attempts.read_text().split().count(launch_id) if attempts.is_file() else 1


def inject_fault(job: Job, rank: int, step: int, at: str) -> None:
    """Test hook: act on a fault planned for (rank, step, place); no-op in normal runs."""
    if job.fault:
        from tunefleet.launcher.training.faults import maybe_inject

        maybe_inject(job.fault, rank=rank, step=step, at=at, output_dir=job.recipe.output_dir)

