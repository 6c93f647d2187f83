"""The CPU-testable parts of the GPU fast path: optimizer choice, regional compilation, refusals."""

from __future__ import annotations

import pytest
import torch
import transformers

from tunefleet.launcher.config import TrainConfig
from tunefleet.launcher.data import batches, packing
from tunefleet.launcher.errors import RecipeError
from tunefleet.launcher.model import attention, modeling
from tunefleet.launcher.plan.layout import make_plan
from tunefleet.strategies.layers import compile_layers

from .test_packing import documents  # noqa: F401 (fixture)
from .test_packing import model_dir as model_dir  # noqa: F401 (fixture)


@pytest.mark.parametrize(("impl", "want"), [("auto", "foreach"), ("foreach", "foreach"), ("fused", "fused")])
def test_adamw_implementation_follows_the_recipe_and_the_device(impl, want):
    params = [torch.nn.Parameter(torch.ones(3))]
    optimizer = modeling.make_optimizer_factory(TrainConfig(max_steps=1, optimizer_impl=impl))([{"params": params}])
    chosen = [name for name in ("fused", "foreach") if optimizer.defaults.get(name)]
    assert chosen == [want]  # auto: foreach on CPU parameters (fused once they sit on a GPU)


def test_fused_and_foreach_adamw_take_the_same_step():
    steps = {}
    for impl in ("fused", "foreach"):
        torch.manual_seed(0)
        param = torch.nn.Parameter(torch.randn(64))
        optimizer = modeling.make_optimizer_factory(TrainConfig(max_steps=3, lr=1e-2, optimizer_impl=impl))(
            [{"params": [param]}])
        for _ in range(3):
            (param.square().sum()).backward()
            optimizer.step()
            optimizer.zero_grad()
        steps[impl] = param.detach()
    torch.testing.assert_close(steps["fused"], steps["foreach"], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_compiled_layers_compute_the_eager_loss_on_packed_rows(model_dir, documents):  # noqa: F811
    """parallelism.compile: every decoder layer compiled (inductor, here on CPU), the same loss and
    gradients as eager on packed rows passed with document boundaries."""
    attention.register()
    batch = batches.collate(packing.pack(documents, max_seq_len=128), range(4), pad_id=0)
    results = []
    for compiled in (False, True):
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attention.NAME)
        if compiled:
            assert compile_layers(model) == model.config.num_hidden_layers
        logits = attention.forward(model, batch, boundaries=True).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:])
        loss.backward()
        results.append((loss.detach(), model.model.layers[0].mlp.up_proj.weight.grad))
    torch.testing.assert_close(results[1], results[0], rtol=1e-4, atol=1e-5)


def test_compile_with_deepspeed_is_refused_naming_the_key(tmp_path):
    from tests.conftest import REPO
    from tunefleet.launcher.config import load_recipe

    recipe = load_recipe(REPO / "recipes" / "tiny" / "llama-full-ddp.yaml",
                         overrides=["parallelism.strategy=deepspeed_zero3", "parallelism.compile=true"])
    with pytest.raises(RecipeError) as excinfo:
        make_plan(recipe)
    assert "parallelism.compile" in str(excinfo.value)

