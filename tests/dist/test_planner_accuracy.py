"""The planner's model-state estimate against what each strategy really holds.

Three random-init Llamas (about 1M, 10M and 40M parameters) are saved to a
temporary folder and loaded by path. One spawned 2-rank gloo group then sets up
every strategy on each of them exactly as ``launcher/train.py`` does, runs one
optimizer step (so AdamW state exists) and one more forward/backward (so
gradients are live), and counts the bytes of the tensors the rank holds for
parameters, gradients and optimizer state: unique storages, local shards. The
planner, given the same recipe, must be within 15% of that for every strategy
and size, and for LoRA and (DeepSpeed) bf16 mixed precision on the smallest.
"""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

import pytest
import torch
import transformers

from tunefleet.launcher.model import modeling
from tunefleet.launcher.plan.layout import strategy_plan
from tunefleet.launcher.plan.memory_fit import plan_report
from tunefleet.launcher.config import Recipe, recipe_from_dict
from tunefleet.launcher.objectives.sft import token_loss_sum, train_step
from tunefleet.launcher.training.throughput import held_bytes
from tunefleet.strategies.registry import create

from .harness import run_ranks

pytestmark = pytest.mark.dist

STRATEGIES = ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3")
WORLD_SIZE = 2
TOLERANCE = 0.15
# About 30 s of CPU per rank; generous for a loaded machine, below pytest's 600 s.
RANKS_TIMEOUT_S = 540
SEQ_LEN = 16
VOCAB_SIZE = 1024
SIZES = {  # approximate parameter count -> Llama dimensions
    "1M": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4),
    "10M": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=10, num_attention_heads=8),
    "40M": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=8),
}
@dataclasses.dataclass(frozen=True)
class Case:
    size: str
    strategy: str
    method: str = "full"
    mixed_precision: str = "no"

    @property
    def key(self) -> str:
        return f"{self.size}-{self.strategy}-{self.method}-{self.mixed_precision}"


CASES = (
    [Case(size, strategy) for size in SIZES for strategy in STRATEGIES]
    + [Case("1M", strategy, method="lora") for strategy in STRATEGIES]
    + [Case("1M", strategy, mixed_precision="bf16") for strategy in ("deepspeed_zero2", "deepspeed_zero3")]
)


def recipe_for(case: Case, model_dir: Path) -> Recipe:
    return recipe_from_dict({
        "name": "planner-accuracy",
        "output_dir": str(model_dir.parent / "run"),
        "model": {"path": str(model_dir / case.size)},
        "method": {"kind": case.method, "lora": {"r": 8}},
        "data": {"sources": [{"path": str(model_dir / "unused.jsonl")}], "max_seq_len": SEQ_LEN},
        "train": {"max_steps": 1},
        "parallelism": {"strategy": case.strategy, "workers_per_node": WORLD_SIZE,
                        "mixed_precision": case.mixed_precision},
    })


# ----------------------------------------------------------------------------- worker side
def _batch() -> dict[str, torch.Tensor]:
    input_ids = torch.randint(0, VOCAB_SIZE, (1, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


def measure(recipe: Recipe) -> dict[str, int]:
    """Set up the recipe's strategy as train.py does, step once, back-propagate again, count."""
    strategy = create(strategy_plan(recipe, recipe.parallelism.strategy))
    module = modeling.load_model(
        recipe.model, recipe.method, recipe.model.path, init_context=strategy.model_init_context()
    )
    strategy.setup(
        module,
        modeling.make_optimizer_factory(recipe.train),
        modeling.make_scheduler_factory(recipe.train),
        modeling.param_groups(module, recipe.train),
    )
    batch, device = _batch(), torch.device("cpu")
    train_step(strategy, [batch], device)
    strategy.model.train()
    strategy.backward(token_loss_sum(strategy.model, batch))
    held = held_bytes(strategy)
    strategy.optimizer_step()
    strategy.teardown()
    gc.collect()
    return held


def measure_all(recipes: dict[str, Recipe]) -> dict[str, dict[str, int]]:
    return {key: measure(recipe) for key, recipe in recipes.items()}


# ----------------------------------------------------------------------------- test side
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("planner-models")
    for size, dims in SIZES.items():
        config = transformers.LlamaConfig(
            vocab_size=VOCAB_SIZE, max_position_embeddings=SEQ_LEN, tie_word_embeddings=False,
            num_key_value_heads=dims["num_attention_heads"] // 2, **dims,
        )
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(config).save_pretrained(root / size)
    return root


@pytest.fixture(scope="module")
def measured(model_dir, tmp_path_factory) -> dict[str, list[dict[str, int]]]:
    """Per case, what each rank holds."""
    recipes = {case.key: recipe_for(case, model_dir) for case in CASES}
    per_rank = run_ranks(
        measure_all, recipes, workdir=tmp_path_factory.mktemp("ranks"), world_size=WORLD_SIZE, timeout_s=RANKS_TIMEOUT_S
    )
    return {key: [rank[key] for rank in per_rank] for key in recipes}


def predicted_bytes(recipe: Recipe) -> int:
    return plan_report(recipe).row_for(recipe.parallelism.strategy).memory.model_state_bytes


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.key)
def test_model_state_estimate_within_tolerance(case, model_dir, measured):
    predicted = predicted_bytes(recipe_for(case, model_dir))
    for rank, held in enumerate(measured[case.key]):
        total = sum(held.values())
        error = predicted / total - 1
        assert abs(error) <= TOLERANCE, (
            f"{case.key} rank {rank}: predicted {predicted / 2**20:.2f} MiB, held {total / 2**20:.2f} MiB "
            f"({error:+.1%}); held by part (MiB): { {k: round(v / 2**20, 2) for k, v in held.items()} }"
        )
