"""tunefleet's own collectives under a process group that, like Ray Train's NCCL group on GPUs, has no
backend for CPU tensors.

The group is made with ``"cuda:gloo"``: gloo serves CUDA tensors only, so any collective on a CPU tensor
over the default group fails with "No backend type associated with device type cpu", exactly as NCCL
does. On a CPU machine every tensor here is on the CPU, so the loop's control-plane helpers (stop flag,
memory statistics, rank-0 broadcasts, attempt counting, checkpoint barriers, preflight) and the
objectives' step and evaluation reductions must all reach a group that serves the CPU. A strategy
that does no collectives of its own stands in for DDP/FSDP/ZeRO, whose collectives run on device
tensors. (Generation is left out: transformers' ``synced_gpus`` flag is reduced on the inputs' device.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tunefleet.launcher import collectives
from tunefleet.launcher.objectives import reward, sft
from tunefleet.launcher.training import loop
from tunefleet.launcher.training.checkpoint import CheckpointManager, latest
from tunefleet.launcher.training.control import StopPoller
from tunefleet.launcher.training.preflight import package_versions, run_preflight
from tunefleet.strategies.base import Strategy, StrategyPlan

from .harness import run_ranks
from .test_strategies import _save_tiny_llama

pytestmark = pytest.mark.dist

NO_CPU_BACKEND = "cuda:gloo"


class LocalStrategy(Strategy):
    """One unwrapped model per rank: the strategy adds no collectives, so every one the test sees is
    tunefleet's own."""

    name = "local-test"

    def setup(self, module, make_optimizer, make_scheduler, param_groups) -> None:
        self.model = module
        self.optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0)

    def optimizer_step(self) -> float | None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return None

    def save(self, path: str) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        torch.save(self.model.state_dict(), Path(path) / f"rank{dist.get_rank()}.pt")

    def load(self, path: str) -> None:
        self.model.load_state_dict(torch.load(Path(path) / f"rank{dist.get_rank()}.pt"))

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.model.state_dict())


def _batch(rank: int, rows: int = 2, width: int = 12) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(rank)
    input_ids = torch.randint(3, 256, (rows, width), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, width - 3:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, sft.IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _everything_on_a_group_without_cpu(model_dir: str, workdir: str) -> dict:
    from transformers import AutoModelForCausalLM

    assert not collectives.serves_cpu(), "the test group must lack a CPU backend"
    with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
        dist.all_reduce(torch.ones(1))  # what today's NCCL groups do to a CPU tensor
    rank, cpu = dist.get_rank(), torch.device("cpu")
    plan = StrategyPlan(name="ddp", world_size=2, num_nodes=1, workers_per_node=2, micro_batch_size=2,
                        grad_accum_steps=1)
    strategy = LocalStrategy(plan)
    strategy.setup(AutoModelForCausalLM.from_pretrained(model_dir), None, None, None)
    out: dict = {}

    problems, report = run_preflight(driver_versions=package_versions(), checkpoint_dir=f"{workdir}/ckpt",
                                     host_bytes_needed=0, device=cpu, node=f"node{rank}")
    out["preflight"] = (problems, report["nodes"])
    out["attempt"] = loop.count_attempt(workdir, "launch-1", rank)
    out["stop"] = StopPoller(None, rank).agreed()
    out["agreed"] = loop.agreed(float(rank + 7), cpu)
    out["memory"] = sorted(loop.memory_per_rank(strategy, cpu))

    result = sft.train_step(strategy, [_batch(rank), _batch(rank + 10)], cpu)
    out["step"] = (result.loss, result.num_tokens)
    out["eval_loss"] = sft.evaluate(strategy, [_batch(rank)], cpu)
    out["pairs"] = reward.count_pairs([_batch(rank, rows=4)], cpu)

    checkpoints = CheckpointManager(f"{workdir}/ckpt", keep_last=1)
    checkpoints.save(1, strategy, {"tokens_seen": 0})
    checkpoints.wait()
    out["checkpoint"] = latest(f"{workdir}/ckpt").name
    return out


def test_every_tunefleet_collective_reaches_a_group_that_serves_its_tensors(tmp_path):
    model_dir = _save_tiny_llama(tmp_path / "model")
    results = run_ranks(_everything_on_a_group_without_cpu, model_dir, str(tmp_path), workdir=tmp_path / "ranks",
                        backend=NO_CPU_BACKEND)
    first, second = results
    assert first["preflight"] == ([], ["node0", "node1"])
    assert first["attempt"] == second["attempt"] == 1
    assert first["stop"] is second["stop"] is False
    assert first["agreed"] == second["agreed"] == 7.0  # rank 0's value everywhere
    assert "held_bytes_per_rank" in first["memory"]
    assert first["step"] == second["step"]  # the global loss and target count, reduced over ranks
    assert first["eval_loss"] == second["eval_loss"]
    assert first["pairs"][0] == 4  # 2 pairs per rank
    assert first["checkpoint"] == "step_1"


def test_gpu_workers_get_a_group_with_a_cpu_backend():
    """Ray Train makes the workers' group from this string: NCCL for device tensors, gloo for host ones."""
    backend = collectives.process_group_backend(use_gpu=True)
    devices = dict(entry.split(":") for entry in backend.split(","))
    assert devices == {"cpu": "gloo", "cuda": "nccl"}
    assert collectives.process_group_backend(use_gpu=False) == "gloo"
