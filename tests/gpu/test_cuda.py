"""What only a CUDA GPU can run: NCCL groups, the flash variable-length kernel on packed rows, fused
AdamW on device parameters, and a 1-GPU `tunefleet launch`. `make gpu-check` runs these (`-m gpu`)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import transformers

from tests.conftest import tunefleet
from tunefleet.launcher import collectives
from tunefleet.launcher.config import TrainConfig
from tunefleet.launcher.data import batches, packing
from tunefleet.launcher.model import attention, modeling
from tunefleet.launcher.model.inputs import IGNORE_INDEX
from tunefleet.launcher.model.tiny import ensure_tiny_model
from tunefleet.launcher.objectives import sft
from tunefleet.launcher.training import loop
from tunefleet.launcher.training.control import StopPoller

from ..dist.harness import free_port
from ..dist.test_collectives import LocalStrategy
from ..unit.test_packing import documents  # noqa: F401 (fixture)
from ..unit.test_packing import model_dir as model_dir  # noqa: F401 (fixture)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda", 0)


@pytest.fixture
def nccl_group():
    """A one-rank group made the way Ray Train makes the GPU workers' group."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    torch.cuda.set_device(CUDA)
    dist.init_process_group(collectives.process_group_backend(use_gpu=True), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_control_plane_and_a_step_on_the_gpu_workers_group(nccl_group, model_dir):  # noqa: F811
    assert collectives.serves_cpu()
    assert StopPoller(None, 0).agreed() is False  # a CPU flag: gloo
    assert loop.agreed(3.0, CUDA) == 3.0  # a device tensor: NCCL
    strategy = LocalStrategy(None)
    strategy.setup(transformers.AutoModelForCausalLM.from_pretrained(model_dir).to(CUDA), None, None, None)
    assert "device_bytes_per_rank" in loop.memory_per_rank(strategy, CUDA)
    ids = torch.randint(3, 256, (2, 16))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    result = sft.train_step(strategy, [batch], CUDA)
    assert result.num_tokens == 30 and torch.isfinite(torch.tensor(result.loss))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_packed_rows_on_the_flash_varlen_kernel_match_unpacked(model_dir, documents, dtype):  # noqa: F811
    attention.register()
    assert attention.packed_kernel(CUDA), "this torch has no torch.nn.attention.varlen"
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attention.NAME,
                                                              dtype=dtype).to(CUDA).eval()
    packed = packing.pack(documents, max_seq_len=128)
    with torch.no_grad():
        losses = {}
        for name, split in (("unpacked", documents), ("packed", packed)):
            batch = {k: v.to(CUDA) for k, v in batches.collate(split, range(len(split)), pad_id=0).items()}
            logits = attention.forward(model, batch).logits[:, :-1].float()
            losses[name] = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:],
                                                             ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(losses["packed"], losses["unpacked"], rtol=2e-2, atol=0)


def test_auto_optimizer_is_fused_on_the_gpu():
    param = torch.nn.Parameter(torch.ones(8, device=CUDA))
    optimizer = modeling.make_optimizer_factory(TrainConfig(max_steps=1))([{"params": [param]}])
    assert optimizer.defaults["fused"] is True


def test_one_gpu_launch_trains_and_exports(tmp_path):
    out = tmp_path / "run"
    result = tunefleet("launch", "recipes/tiny/llama-full-ddp.yaml", f"--set=output_dir={out}",
                       "--set=parallelism.use_gpu=true", "--set=parallelism.workers_per_node=1",
                       "--set=parallelism.mixed_precision=bf16", "--set=train.max_steps=12",
                       "--set=train.eval_every_steps=6", "--set=checkpoint.every_steps=6",
                       "--set=logging.wandb.mode=disabled", "--set=data.packing=true")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["eval_loss_after"] < summary["eval_loss_before"]
    model = transformers.AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.config.vocab_size == transformers.AutoConfig.from_pretrained(ensure_tiny_model("llama")).vocab_size
