"""Every peft method trains under 2-rank DDP and under a sharding strategy, and saves an adapter
peft reloads exactly.

Each parametrized case writes a run folder (``recipe.resolved.yaml``) and spawns a
2-rank gloo group that loads the tiny Llama through the real ``load_model``, trains
``NUM_STEPS`` seeded steps with ``train_step``, checkpoints with
``CheckpointManager``, writes ``final/`` with ``save_final`` on rank 0 and returns
the trained model's logits on fixed inputs. The test reloads ``final/`` and the
folder ``tunefleet export`` writes from the checkpoint with plain peft in this
process and compares logits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from .harness import run_ranks

pytestmark = pytest.mark.dist

WORLD_SIZE = 2
ROWS_PER_RANK = 2
SEQ_LEN = 12
NUM_STEPS = 2
VOCAB_SIZE = 1024  # tiny:llama's tokenizer
LOGITS_RTOL = 1e-5
METHODS = {
    "lora": {"kind": "lora", "lora": {"r": 4}},
    "qlora": {"kind": "qlora", "lora": {"r": 4}},
    "dora-rslora": {"kind": "lora", "lora": {"r": 4, "use_dora": True, "use_rslora": True}},
    "ia3": {"kind": "ia3"},
    "prefix_tuning": {"kind": "prefix_tuning", "virtual_tokens": {"num": 4}},
    "prompt_tuning": {"kind": "prompt_tuning", "virtual_tokens": {"num": 4}},
}


def _batch(step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(4000 + step)
    rows = torch.randint(4, VOCAB_SIZE, (WORLD_SIZE * ROWS_PER_RANK, SEQ_LEN), generator=gen)
    return {"input_ids": rows, "attention_mask": torch.ones_like(rows), "labels": rows.clone()}


def train_and_save(strategy_name: str, run_dir: str) -> torch.Tensor:
    """Rank side: train the run's recipe, checkpoint, save ``final/`` on rank 0; the trained logits of
    ``_batch(-1)``."""
    from tunefleet.launcher.training.checkpoint import CheckpointManager
    from tunefleet.launcher.run.export import read_run_recipe
    from tunefleet.launcher.model.modeling import (
        load_model,
        load_tokenizer,
        make_optimizer_factory,
        make_scheduler_factory,
        param_groups,
        save_final,
    )
    from tunefleet.launcher.objectives.sft import train_step
    from tunefleet.strategies.base import StrategyPlan
    from tunefleet.strategies.registry import create

    recipe = read_run_recipe(Path(run_dir))
    train = recipe.train
    strategy = create(StrategyPlan(
        name=strategy_name, world_size=WORLD_SIZE, num_nodes=1, workers_per_node=WORLD_SIZE, use_gpu=False,
        micro_batch_size=ROWS_PER_RANK, grad_accum_steps=1, max_grad_norm=1.0,
        deepspeed_overrides={"zero_optimization": {"stage3_param_persistence_threshold": 0}}
        if strategy_name == "deepspeed_zero3" else {},
    ))
    torch.manual_seed(0)  # peft's random inits (prompt tables) equal on every rank and strategy
    model = load_model(recipe.model, recipe.method, recipe.model.path, init_context=strategy.model_init_context())
    strategy.setup(model, make_optimizer_factory(train), make_scheduler_factory(train), param_groups(model, train))
    start = dist.get_rank() * ROWS_PER_RANK
    for step in range(NUM_STEPS):
        rows = {key: value[start : start + ROWS_PER_RANK] for key, value in _batch(step).items()}
        train_step(strategy, [rows], torch.device("cpu"))
    meta = {"world_size": WORLD_SIZE, "strategy": strategy_name, "global_batch_rows": WORLD_SIZE * ROWS_PER_RANK}
    CheckpointManager(recipe.checkpoint_dir, keep_last=1).save(NUM_STEPS, strategy, meta)
    state = strategy.full_state_dict()
    if dist.get_rank() == 0:
        save_final(strategy.unwrapped, state, load_tokenizer(recipe.model.path), Path(run_dir) / "final")
    dist.barrier()
    test = _batch(-1)
    with torch.no_grad():
        strategy.model.eval()
        logits = strategy.model(input_ids=test["input_ids"], attention_mask=test["attention_mask"],
                                use_cache=False).logits
    strategy.teardown()
    return logits


def write_run(run_dir: Path, model_dir: str, strategy: str, method: dict) -> None:
    from tunefleet.launcher.config import Recipe

    recipe = Recipe.model_validate({
        "name": "peft-methods", "output_dir": str(run_dir), "model": {"path": model_dir}, "method": method,
        "data": {"sources": [{"path": str(run_dir / "unused.jsonl"), "format": "text"}]},
        "train": {"max_steps": NUM_STEPS, "micro_batch_size": ROWS_PER_RANK, "lr": 1e-2, "weight_decay": 0.01},
        "parallelism": {"strategy": strategy, "workers_per_node": WORLD_SIZE},
        "checkpoint": {"every_steps": NUM_STEPS, "keep_last": 1},
    })
    run_dir.mkdir(parents=True)
    (run_dir / "recipe.resolved.yaml").write_text(recipe.to_yaml())


def reload_logits(out_dir: str, method: dict) -> torch.Tensor:
    """Logits of the saved adapter, loaded with plain peft (its virtual-token positions dropped); a QLoRA
    adapter onto its base quantized as in training."""
    import peft
    import transformers

    quantized = {"quantization_config": transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32)} if method["kind"] == "qlora" else {}
    model = peft.AutoPeftModelForCausalLM.from_pretrained(out_dir, **quantized).eval()
    test = _batch(-1)
    with torch.no_grad():
        logits = model(input_ids=test["input_ids"], attention_mask=test["attention_mask"]).logits
    return logits[:, logits.shape[1] - SEQ_LEN :]


@pytest.fixture(scope="module")
def tiny_llama_dir() -> str:
    from tunefleet.launcher.model.tiny import ensure_tiny_model

    return str(ensure_tiny_model("llama"))


# Every method under DDP and under FSDP2, where peft's own save_pretrained fails on a sharded prompt
# table (``modeling.save_final`` computes it from the gathered state instead). LoRA under the ZeRO
# stages: tests/dist/test_strategies.py and test_export.py.
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("name", list(METHODS))
def test_method_trains_and_reloads_with_peft(strategy, name, tiny_llama_dir, tmp_path):
    from tunefleet.launcher.run.export import export

    run_dir = tmp_path / "run"
    write_run(run_dir, tiny_llama_dir, strategy, METHODS[name])
    logits = run_ranks(train_and_save, strategy, str(run_dir), workdir=tmp_path / "ranks", world_size=WORLD_SIZE)
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)  # the ranks hold the same model
    assert (run_dir / "final" / "adapter_config.json").is_file()
    export(run_dir, out=tmp_path / "exported")
    for saved in (run_dir / "final", tmp_path / "exported"):
        torch.testing.assert_close(reload_logits(str(saved), METHODS[name]), logits[0], rtol=LOGITS_RTOL, atol=1e-6)
