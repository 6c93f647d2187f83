"""`tunefleet export --merge-lora` of a finished LoRA run that kept no checkpoints: the adapter
folder in ``<run>/final/`` merged into the base model, in one plain process.

The run folder is built here without training: the tiny Llama with a LoRA adapter whose factors
are set to seeded random values (a fresh adapter's ``lora_B`` is zero, so merging it would change
nothing), saved to ``final/`` as training saves it (``modeling.save_final``), next to the run's
``recipe.resolved.yaml``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tunefleet.launcher.config import RESOLVED_RECIPE, Recipe
from tunefleet.launcher.errors import UserError
from tunefleet.launcher.model import modeling
from tunefleet.launcher.model.tiny import ensure_tiny_model
from tunefleet.launcher.run.export import export, read_run_recipe

SEQ_LEN = 16
VOCAB_SIZE = 1024  # tiny:llama's tokenizer
# As tests/dist/test_export.py measured: merging computes x (W + B A s) instead of x W + (x A) B s.
LOGITS_RTOL, MERGED_LOGITS_ATOL = 1e-5, 1e-6


def _logits(model: torch.nn.Module) -> torch.Tensor:
    inputs = torch.randint(0, VOCAB_SIZE, (2, SEQ_LEN), generator=torch.Generator().manual_seed(7))
    model.eval()
    with torch.no_grad():
        return model(input_ids=inputs).logits


@pytest.fixture(scope="module")
def model_dir() -> str:
    return str(ensure_tiny_model("llama"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, model_dir) -> tuple[Path, torch.Tensor]:
    """A LoRA run folder with final/ and no checkpoints, and the logits of its adapted model."""
    run_dir = tmp_path_factory.mktemp("run")
    recipe = Recipe.model_validate({
        "name": "final-lora", "output_dir": str(run_dir), "model": {"path": model_dir},
        "method": {"kind": "lora", "lora": {"r": 4, "alpha": 8}},
        "data": {"sources": [{"path": str(run_dir / "unused.jsonl"), "format": "text"}]},
        "train": {"max_steps": 3, "micro_batch_size": 2, "warmup_steps": 1},
        "parallelism": {"strategy": "ddp", "workers_per_node": 1},
    })
    (run_dir / RESOLVED_RECIPE).write_text(recipe.to_yaml())
    model = modeling.load_model(recipe.model, recipe.method, model_dir)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    modeling.save_final(model, model.state_dict(), modeling.load_tokenizer(model_dir), run_dir / "final")
    assert not Path(read_run_recipe(run_dir).checkpoint_dir).exists()
    return run_dir, _logits(model)


def test_merge_lora_without_checkpoints_merges_final(finished_run, model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir, adapted_logits = finished_run
    report = export(run_dir, out=tmp_path / "out", merge_lora=True)
    assert (report.kind, report.checkpoint, report.strategy) == ("merged", str(run_dir / "final"), "ddp")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert not any("lora" in name for name in merged.state_dict())
    base_logits = _logits(AutoModelForCausalLM.from_pretrained(model_dir))
    assert not torch.allclose(adapted_logits, base_logits, rtol=1e-3, atol=0), "the adapter changes nothing"
    torch.testing.assert_close(_logits(merged), adapted_logits, rtol=LOGITS_RTOL, atol=MERGED_LOGITS_ATOL)


def test_merge_lora_of_a_missing_step_still_refuses(finished_run, tmp_path):
    run_dir, _ = finished_run
    with pytest.raises(UserError, match="no complete checkpoint under"):
        export(run_dir, step=3, out=tmp_path / "out", merge_lora=True)


def test_adapter_export_without_checkpoints_points_at_final(finished_run, tmp_path):
    run_dir, _ = finished_run
    with pytest.raises(UserError, match=re.escape(f"{run_dir / 'final'} already holds the trained adapter (a PEFT")):
        export(run_dir, out=tmp_path / "out")
