"""The peft family in one process: each method trains a few steps on the tiny Llama and
its saved adapter, reloaded with plain peft, gives the trained model's logits."""

from __future__ import annotations

import pytest
import torch

from tunefleet.launcher.config import MethodConfig, ModelConfig, TrainConfig
from tunefleet.launcher.model import modeling

NUM_STEPS = 3
SEQ_LEN = 10
LOGITS_RTOL = 1e-5
METHODS = {
    "lora-dora": {"kind": "lora", "lora": {"r": 4, "use_dora": True}},
    "lora-rslora": {"kind": "lora", "lora": {"r": 4, "use_rslora": True}},
    "ia3": {"kind": "ia3"},
    "ia3-chosen-modules": {"kind": "ia3", "ia3": {"target_modules": ["q_proj", "up_proj"],
                                                  "feedforward_modules": ["up_proj"]}},
    "prefix_tuning": {"kind": "prefix_tuning", "virtual_tokens": {"num": 4}},
    "prefix_tuning-projection": {"kind": "prefix_tuning", "virtual_tokens": {"num": 4, "projection": True}},
    "prompt_tuning": {"kind": "prompt_tuning", "virtual_tokens": {"num": 4}},
    "prompt_tuning-text": {"kind": "prompt_tuning", "virtual_tokens": {"num": 4, "init_text": "answer the question"}},
}


@pytest.fixture(scope="module")
def model_dir() -> str:
    return modeling.resolve_model_path(ModelConfig(path="tiny:llama"))


def _batch(seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(4, 1024, (2, SEQ_LEN), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**_batch(-1), use_cache=False).logits


@pytest.mark.parametrize("name", list(METHODS))
def test_method_trains_and_its_adapter_reloads_with_peft(name, model_dir, tmp_path):
    import peft

    torch.manual_seed(0)
    model = modeling.load_model(ModelConfig(path=model_dir), MethodConfig(**METHODS[name]), model_dir)
    base_params = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert base_params, "the base must stay frozen"
    train = TrainConfig(max_steps=NUM_STEPS, lr=1e-2, weight_decay=0.01, schedule="constant")
    optimizer = modeling.make_optimizer_factory(train)(modeling.param_groups(model, train))
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for step in range(NUM_STEPS):
        batch = _batch(step)
        logits = model(**batch, use_cache=False).logits  # virtual-token positions already dropped
        assert logits.shape[:2] == batch["input_ids"].shape
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert all(not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if n in trainable)
    model.eval()
    want = _logits(model)

    modeling.save_final(model, model.state_dict(), modeling.load_tokenizer(model_dir), tmp_path / "final")
    reloaded = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    got = _logits(reloaded)
    torch.testing.assert_close(got[:, got.shape[1] - SEQ_LEN :], want, rtol=LOGITS_RTOL, atol=1e-6)


def test_prompt_tuning_rejects_packing_and_dpo():
    from tunefleet.launcher.config import Recipe

    raw = {"name": "x", "output_dir": "/tmp/x", "model": {"path": "tiny:llama"},
           "method": {"kind": "prompt_tuning"}, "train": {"max_steps": 2},
           "data": {"sources": [{"path": "/tmp/x.jsonl"}], "packing": True}}
    with pytest.raises(ValueError, match="data.packing"):
        Recipe.model_validate(raw)
    with pytest.raises(ValueError, match="method.objective"):
        MethodConfig(kind="prefix_tuning", objective="dpo")
