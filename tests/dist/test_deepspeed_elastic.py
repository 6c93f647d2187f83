"""DeepSpeed ZeRO resumes at another world size through a universal checkpoint.

ZeRO-2 and ZeRO-3 train a tiny Llama on 2 ranks for ``NUM_STEPS`` steps and
save after ``SAVE_AFTER_STEPS``; the same checkpoint is then resumed on 1 and on
3 ranks, with accumulation rebalanced (``tunefleet.launcher.plan.layout.rebalance``) so
that every step sees the same global batch, split over however many ranks there
are. The continuation must match the uninterrupted 2-rank run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from .harness import run_ranks
from .test_strategies import SEQ_LEN, VOCAB_SIZE, ZERO3_OVERRIDES, _save_tiny_llama

pytestmark = pytest.mark.dist

STRATEGIES = ("deepspeed_zero3", "deepspeed_zero2")
SAVE_WORLD_SIZE = 2
RESUME_WORLD_SIZES = (1, 3)
MICRO_BATCH_SIZE = 2
GLOBAL_ROWS = 12  # splits into micro-batches of 2 on 1, 2 and 3 ranks (accumulation 6, 3, 2)
SAVE_AFTER_STEPS = 4
NUM_STEPS = 7
# Same tolerances as tests/dist/test_strategies.py: another world size reduces the
# gradients in another order, so only the last bits may differ. Measured: losses within
# 3.1e-8 (relative), weights within 2e-6.
LOSS_RTOL = 1e-5
WEIGHT_RTOL, WEIGHT_ATOL = 1e-5, 1e-5


# ----------------------------------------------------------------------------- worker side
def _plan(strategy: str, world_size: int):
    """The 2-rank plan, rebalanced to ``world_size`` ranks as a resume at another size does."""
    from tunefleet.launcher.plan.layout import rebalance
    from tunefleet.strategies.base import StrategyPlan

    saved = StrategyPlan(
        name=strategy, world_size=SAVE_WORLD_SIZE, num_nodes=1, workers_per_node=SAVE_WORLD_SIZE,
        micro_batch_size=MICRO_BATCH_SIZE, grad_accum_steps=GLOBAL_ROWS // SAVE_WORLD_SIZE // MICRO_BATCH_SIZE,
        max_grad_norm=1.0, deepspeed_overrides=ZERO3_OVERRIDES if strategy == "deepspeed_zero3" else {},
    )
    return rebalance(saved, world_size=world_size)


def _micro_batches(step: int) -> list[dict[str, torch.Tensor]]:
    """This rank's share of the step's seeded global batch, in micro-batches."""
    gen = torch.Generator().manual_seed(2000 + step)
    input_ids = torch.randint(0, VOCAB_SIZE, (GLOBAL_ROWS, SEQ_LEN), generator=gen)
    labels = input_ids.clone()
    labels[torch.rand(GLOBAL_ROWS, SEQ_LEN, generator=gen) < 0.25] = -100
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    rows_per_rank = GLOBAL_ROWS // dist.get_world_size()
    start = dist.get_rank() * rows_per_rank
    return [
        {key: value[i : i + MICRO_BATCH_SIZE] for key, value in batch.items()}
        for i in range(start, start + rows_per_rank, MICRO_BATCH_SIZE)
    ]


def _train(strategy_name: str, model_dir: str, checkpoint: str, resume: bool) -> dict:
    from tunefleet.launcher.model.modeling import load_model, make_optimizer_factory, make_scheduler_factory, param_groups
    from tunefleet.launcher.config import MethodConfig, ModelConfig, TrainConfig
    from tunefleet.launcher.objectives.sft import train_step
    from tunefleet.strategies.registry import create

    plan = _plan(strategy_name, dist.get_world_size())
    train = TrainConfig(max_steps=NUM_STEPS, micro_batch_size=plan.micro_batch_size,
                        grad_accum_steps=plan.grad_accum_steps, lr=1e-3, weight_decay=0.01, warmup_steps=2)
    strategy = create(plan)
    model = load_model(ModelConfig(path=model_dir), MethodConfig(), model_dir,
                       init_context=strategy.model_init_context())
    strategy.setup(model, make_optimizer_factory(train), make_scheduler_factory(train), param_groups(model, train))
    if resume:
        strategy.load(checkpoint)
    losses = []
    for step in range(SAVE_AFTER_STEPS if resume else 0, NUM_STEPS):
        losses.append(train_step(strategy, _micro_batches(step), torch.device("cpu")).loss)
        if not resume and step + 1 == SAVE_AFTER_STEPS:
            strategy.save(checkpoint)
    out = {"losses": losses, "state": strategy.full_state_dict()}
    strategy.teardown()
    return out


def _run_all(model_dir: str, checkpoints: str, resume: bool) -> dict[str, dict]:
    results = {}
    for strategy in STRATEGIES:
        results[strategy] = _train(strategy, model_dir, os.path.join(checkpoints, strategy), resume)
        dist.barrier()
    return results


# ----------------------------------------------------------------------------- parent side
def _universal_stamp(checkpoints: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of each converted folder: unchanged when a later resume reuses it."""
    stamps = {}
    for strategy in STRATEGIES:
        info = (checkpoints / strategy / "universal").stat()
        stamps[strategy] = (info.st_ino, info.st_mtime_ns)
    return stamps


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    """Rank 0's results per world size (2: the uninterrupted run), and the conversion stamps."""
    root = tmp_path_factory.mktemp("elastic")
    model_dir = _save_tiny_llama(root / "model")
    checkpoints = root / "checkpoints"
    by_world = {SAVE_WORLD_SIZE: run_ranks(_run_all, model_dir, str(checkpoints), False, workdir=root / "ranks",
                                           world_size=SAVE_WORLD_SIZE, timeout_s=480)[0]}
    stamps = []
    for world_size in RESUME_WORLD_SIZES:
        by_world[world_size] = run_ranks(_run_all, model_dir, str(checkpoints), True, workdir=root / "ranks",
                                         world_size=world_size, timeout_s=480)[0]
        stamps.append(_universal_stamp(checkpoints))
    return {"by_world": by_world, "stamps": stamps, "checkpoints": checkpoints}


@pytest.mark.parametrize("world_size", RESUME_WORLD_SIZES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_resume_at_another_world_size_continues_the_run(results, strategy, world_size):
    resumed = results["by_world"][world_size][strategy]
    straight = results["by_world"][SAVE_WORLD_SIZE][strategy]
    torch.testing.assert_close(resumed["losses"], straight["losses"][SAVE_AFTER_STEPS:], rtol=LOSS_RTOL, atol=0)
    assert resumed["state"].keys() == straight["state"].keys()
    for key, value in straight["state"].items():
        torch.testing.assert_close(resumed["state"][key], value, rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL,
                                   msg=lambda message, key=key: f"{key}: {message}")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_checkpoint_is_converted_once(results, strategy):
    first, second = results["stamps"]
    assert first[strategy] == second[strategy], "the 3-rank resume converted again instead of reusing the folder"
    state = results["checkpoints"] / strategy
    assert (state / "universal" / "deepspeed" / "zero" / "optimizer_state.pt").is_file()
    assert not [p.name for p in state.iterdir() if p.name.startswith(".")], "a staging folder was left behind"
