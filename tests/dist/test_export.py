"""`tunefleet export` turns a checkpoint of every strategy into a Hugging Face folder.

One spawned 2-rank gloo group trains the tiny Llama for ``NUM_STEPS`` steps with
every strategy, full and LoRA, through the real ``load_model``, strategies and
``train_step``, and saves a checkpoint with ``CheckpointManager`` into a run
folder that holds the run's ``recipe.resolved.yaml``; ranks return the trained
weights (``full_state_dict``). The tests then export in this process, with no
process group, load the folders with transformers and PEFT, and compare their
logits on fixed inputs with those of the trained model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from .harness import run_ranks
from .test_strategies import SEQ_LEN, ZERO3_OVERRIDES

pytestmark = pytest.mark.dist

STRATEGIES = ("ddp", "fsdp", "deepspeed_zero3", "deepspeed_zero2")
METHODS = ("full", "lora")
WORLD_SIZE = 2
ROWS_PER_RANK = 4
NUM_STEPS = 3
VOCAB_SIZE = 1024  # tiny:llama's tokenizer
# An exported full or adapter folder holds the trained tensors bit for bit: its logits are
# identical (measured). Merging computes x (W + B A s) instead of x W + (x A) B s: measured worst
# |difference| 5.7e-7 on logits up to 0.9, so near-zero logits need a small absolute tolerance.
LOGITS_RTOL, MERGED_LOGITS_ATOL = 1e-5, 1e-6
SHARD_SIZE = "1MB"  # the tiny Llama has ~4 MB of fp32 weights


def _key(strategy: str, method: str) -> str:
    return f"{strategy}-{method}"


# ----------------------------------------------------------------------------- worker side
def _micro_batches(step: int, micro: int = 2) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3000 + step)
    input_ids = torch.randint(0, VOCAB_SIZE, (WORLD_SIZE * ROWS_PER_RANK, SEQ_LEN), generator=gen)
    start = dist.get_rank() * ROWS_PER_RANK
    mine = input_ids[start : start + ROWS_PER_RANK]
    return [{"input_ids": rows, "attention_mask": torch.ones_like(rows), "labels": rows.clone()}
            for rows in mine.split(micro)]


def _train_and_save(run_dir: Path) -> dict[str, torch.Tensor]:
    """Train the run's recipe, checkpoint it at the last step; the trained weights on rank 0."""
    from tunefleet.launcher.training.checkpoint import CheckpointManager
    from tunefleet.launcher.run.export import read_run_recipe
    from tunefleet.launcher.model.modeling import load_model, make_optimizer_factory, make_scheduler_factory, param_groups
    from tunefleet.launcher.plan.layout import strategy_plan
    from tunefleet.launcher.objectives.sft import train_step
    from tunefleet.strategies.registry import create

    recipe = read_run_recipe(run_dir)
    plan = strategy_plan(recipe, recipe.parallelism.strategy)
    if plan.name == "deepspeed_zero3":
        plan = plan.model_copy(update={"deepspeed_overrides": ZERO3_OVERRIDES})
    strategy = create(plan)
    model = load_model(recipe.model, recipe.method, recipe.model.path, init_context=strategy.model_init_context())
    train = recipe.train
    strategy.setup(model, make_optimizer_factory(train), make_scheduler_factory(train), param_groups(model, train))
    for step in range(NUM_STEPS):
        train_step(strategy, _micro_batches(step, plan.micro_batch_size), torch.device("cpu"))
    meta = {"world_size": WORLD_SIZE, "strategy": plan.name, "global_batch_rows": plan.global_batch_rows}
    CheckpointManager(recipe.checkpoint_dir, keep_last=1).save(NUM_STEPS, strategy, meta)
    state = strategy.full_state_dict()
    strategy.teardown()
    return state


def _train_all(runs_root: str) -> dict[str, dict[str, torch.Tensor]]:
    states = {}
    for strategy in STRATEGIES:
        for method in METHODS:
            states[_key(strategy, method)] = _train_and_save(Path(runs_root) / _key(strategy, method))
            dist.barrier()
    return states


# ----------------------------------------------------------------------------- parent side
def _write_run(run_dir: Path, model_dir: str, strategy: str, method: str) -> None:
    from tunefleet.launcher.config import Recipe

    recipe = Recipe.model_validate({
        "name": f"export-{strategy}-{method}", "output_dir": str(run_dir), "model": {"path": model_dir},
        "method": {"kind": method}, "data": {"sources": [{"path": str(run_dir / "unused.jsonl"), "format": "text"}]},
        "train": {"max_steps": NUM_STEPS, "micro_batch_size": 2, "grad_accum_steps": 2, "lr": 1e-2,
                  "warmup_steps": 1, "weight_decay": 0.01},
        "parallelism": {"strategy": strategy, "workers_per_node": WORLD_SIZE},
        "checkpoint": {"every_steps": NUM_STEPS, "keep_last": 1},
    })
    run_dir.mkdir(parents=True)
    header = f"# Resolved by tunefleet: every default filled in, paths absolute.\n# strategy: {strategy} (test)\n"
    (run_dir / "recipe.resolved.yaml").write_text(header + recipe.to_yaml())


def _logits(model: torch.nn.Module) -> torch.Tensor:
    inputs = torch.randint(0, VOCAB_SIZE, (2, SEQ_LEN), generator=torch.Generator().manual_seed(7))
    model.eval()
    with torch.no_grad():
        return model(input_ids=inputs).logits


def _trained_logits(run_dir: Path, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of the model as trained: a fresh model of the recipe holding the trained weights."""
    from tunefleet.launcher.run.export import read_run_recipe
    from tunefleet.launcher.model.modeling import load_model

    recipe = read_run_recipe(run_dir)
    model = load_model(recipe.model, recipe.method, recipe.model.path)
    model.load_state_dict(state, strict=True)
    return _logits(model)


@pytest.fixture(scope="module")
def model_dir() -> str:
    from tunefleet.launcher.model.tiny import ensure_tiny_model

    return str(ensure_tiny_model("llama"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, model_dir) -> dict[str, dict]:
    """Per scenario: its run folder and the trained model's logits."""
    root = tmp_path_factory.mktemp("export")
    for strategy in STRATEGIES:
        for method in METHODS:
            _write_run(root / "runs" / _key(strategy, method), model_dir, strategy, method)
    states = run_ranks(_train_all, str(root / "runs"), workdir=root / "ranks", world_size=WORLD_SIZE,
                       timeout_s=480)[0]
    return {key: {"run_dir": root / "runs" / key, "logits": _trained_logits(root / "runs" / key, state)}
            for key, state in states.items()}


def _export(run: dict, out: Path, **options):
    from tunefleet.launcher.run.export import export

    report = export(run["run_dir"], out=out, **options)
    assert not dist.is_initialized()  # a plain process: no process group, no Ray
    assert report.start_rss_bytes <= report.peak_rss_bytes
    print(f"{report.strategy} {report.kind} {len(report.files)} file(s): peak RSS "
          f"{report.peak_rss_bytes / 2**20:.0f} MiB (+{report.peak_extra_bytes / 2**20:.1f} MiB)")
    return report


def _load(folder: Path, model_dir: str | None = None) -> torch.nn.Module:
    """The exported model; with ``model_dir`` the adapter folder on that base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if model_dir is None:
        return AutoModelForCausalLM.from_pretrained(folder)
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), folder)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_export_gives_the_trained_logits(trained, model_dir, tmp_path, strategy, method):
    run = trained[_key(strategy, method)]
    _export(run, tmp_path / "out")
    files = {p.name for p in (tmp_path / "out").iterdir()}
    if method == "full":
        assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= files
        model = _load(tmp_path / "out")
    else:
        assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= files
        assert "model.safetensors" not in files
        model = _load(tmp_path / "out", model_dir)
    torch.testing.assert_close(_logits(model), run["logits"], rtol=LOGITS_RTOL, atol=0)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_merged_lora_gives_the_trained_logits(trained, model_dir, tmp_path, strategy):
    run = trained[_key(strategy, "lora")]
    report = _export(run, tmp_path / "out", merge_lora=True)
    assert report.kind == "merged"
    merged = _load(tmp_path / "out")
    assert not any("lora" in name for name in merged.state_dict())
    base_logits = _logits(_load(Path(model_dir)))
    assert not torch.allclose(run["logits"], base_logits, rtol=1e-3, atol=0), "training did not move the adapters"
    torch.testing.assert_close(_logits(merged), run["logits"], rtol=LOGITS_RTOL, atol=MERGED_LOGITS_ATOL)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sharded_export_loads(trained, tmp_path, strategy):
    run = trained[_key(strategy, "full")]
    report = _export(run, tmp_path / "out", max_shard_size=SHARD_SIZE)
    assert len(report.files) > 1
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(report.files)
    assert all((tmp_path / "out" / name).stat().st_size <= 1_000_000 + 100_000 for name in report.files)
    torch.testing.assert_close(_logits(_load(tmp_path / "out")), run["logits"], rtol=LOGITS_RTOL, atol=0)


def test_bf16_export_writes_bf16(trained, tmp_path):
    from safetensors import safe_open

    run = trained[_key("deepspeed_zero3", "full")]
    _export(run, tmp_path / "out", dtype="bf16")
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as weights:
        names = weights.keys()
        assert {weights.get_tensor(name).dtype for name in names} == {torch.bfloat16}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    torch.testing.assert_close(_logits(_load(tmp_path / "out")).float(), run["logits"], rtol=0.05, atol=0.05)


def test_export_picks_a_step_and_refuses_a_missing_one(trained, tmp_path):
    from tunefleet.launcher.errors import UserError
    from tunefleet.launcher.run.export import export

    run = trained[_key("ddp", "full")]
    assert export(run["run_dir"], step=NUM_STEPS, out=tmp_path / "out").checkpoint.endswith(f"step_{NUM_STEPS}")
    with pytest.raises(UserError, match=f"complete steps: {NUM_STEPS}"):
        export(run["run_dir"], step=NUM_STEPS + 1, out=tmp_path / "other")
    with pytest.raises(UserError, match="not empty"):
        export(run["run_dir"], out=tmp_path / "out")
