"""Numerical proof that every strategy trains the same model the same way.

One spawned 2-rank gloo group runs every scenario in ``RUNS`` in turn (a tiny
random Llama loaded by path, fp32, 10 steps of seeded batches with ignored
labels) through the real ``load_model``, ``train_step`` and ``evaluate``; the
tests then compare what the ranks returned. DDP is the reference.
"""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from .harness import run_ranks

pytestmark = pytest.mark.dist

# ZeRO-3 before ZeRO-2: its model is built before any DeepSpeed engine exists in the
# process, as in a real run (a missing DeepSpeed comm init once hid behind ZeRO-2).
STRATEGIES = ("ddp", "fsdp", "deepspeed_zero3", "deepspeed_zero2")
WORLD_SIZE = 2
ROWS_PER_RANK = 4
SEQ_LEN = 16
VOCAB_SIZE = 256
NUM_STEPS = 10
SAVE_AFTER_STEPS = 7  # the plain runs checkpoint here; the resume runs continue from it
# Below ZeRO-3's default persistence threshold (1e5 elements) DeepSpeed keeps a
# parameter whole on every rank, which would be every parameter of the tiny model.
ZERO3_OVERRIDES = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}

# Losses agree to 1e-7 (measured). Weights need an absolute tolerance too: the
# strategies reduce gradients in different orders (all-reduce, reduce-scatter,
# DeepSpeed's buckets and autograd hooks), so gradients differ in the last bits,
# and AdamW divides each element's update by that element's own gradient size, so
# last-bit gradient differences become weight differences of up to ~1e-3 x lr
# whatever the weight's size; near zero no relative tolerance holds. Measured
# worst |dw| after 10 steps at lr 1e-3: 2.6e-6 (ZeRO-3, micro 1 x 4 vs micro 4 x 1).
LOSS_RTOL = 1e-5
WEIGHT_RTOL, WEIGHT_ATOL = 1e-5, 1e-5

# Rank-local parameter + master-copy + AdamW-state bytes relative to DDP's 12 bytes
# per parameter (fp32 weight and two moments) at 2 ranks: FSDP holds half of each;
# DeepSpeed also clones an fp32 master partition, even in fp32 (ZeRO-3: 16/2 of 12;
# ZeRO-2: 4 + 12/2 of 12).
HELD_BYTES_VS_DDP = {"fsdp": 6 / 12, "deepspeed_zero3": 8 / 12, "deepspeed_zero2": 10 / 12}


@dataclasses.dataclass(frozen=True)
class Run:
    strategy: str
    method: str = "full"
    micro: int = 2
    accum: int = 2
    activation_checkpointing: bool = False
    cpu_offload: bool = False
    resume: bool = False  # start from the checkpoint the plain run saved
    use_gpu: bool = False

    @property
    def key(self) -> str:
        flags = [name for name, on in (("ac", self.activation_checkpointing), ("offload", self.cpu_offload),
                                       ("resume", self.resume)) if on]
        return "-".join([self.strategy, self.method, f"m{self.micro}a{self.accum}", *flags])

    @property
    def saves(self) -> bool:
        return self == Run(self.strategy, use_gpu=self.use_gpu)


RUNS = (
    [Run(s) for s in STRATEGIES]
    + [Run(s, method="lora") for s in STRATEGIES]
    + [Run(s, micro=m, accum=a) for s in STRATEGIES for m, a in ((4, 1), (1, 4))]
    + [Run(s, activation_checkpointing=True) for s in ("fsdp", "deepspeed_zero3")]
    + [Run(s, cpu_offload=True) for s in ("fsdp", "deepspeed_zero3", "deepspeed_zero2")]
    + [Run(s, resume=True) for s in STRATEGIES]
)


# ----------------------------------------------------------------------------- worker side
def _global_batch(step: int) -> dict[str, torch.Tensor]:
    """Seeded rows for every rank; ragged lengths (right padding) and 25% ignored labels."""
    gen = torch.Generator().manual_seed(1000 + step)
    rows = WORLD_SIZE * ROWS_PER_RANK
    input_ids = torch.randint(0, VOCAB_SIZE, (rows, SEQ_LEN), generator=gen)
    lengths = torch.randint(SEQ_LEN // 2, SEQ_LEN + 1, (rows, 1), generator=gen)
    attention_mask = torch.arange(SEQ_LEN) < lengths
    labels = input_ids.clone()
    labels[(torch.rand(rows, SEQ_LEN, generator=gen) < 0.25) | ~attention_mask] = -100
    input_ids[~attention_mask] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask.long(), "labels": labels}


def _micro_batches(step: int, micro: int) -> list[dict[str, torch.Tensor]]:
    start = dist.get_rank() * ROWS_PER_RANK
    mine = {k: v[start : start + ROWS_PER_RANK] for k, v in _global_batch(step).items()}
    return [{k: v[i : i + micro] for k, v in mine.items()} for i in range(0, ROWS_PER_RANK, micro)]


def _reset_lora(model: torch.nn.Module) -> None:
    """Adapter weights from their names, independent of how much RNG model loading used."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """What this rank stores for ``tensor``: a DTensor shard, a ZeRO-3 partition, or itself."""
    if hasattr(tensor, "to_local"):
        return tensor.to_local()
    return getattr(tensor, "ds_tensor", tensor)


def _held_bytes(strategy) -> int:
    """Bytes of parameters, master copies and optimizer state on this rank, each storage once."""
    optimizer = getattr(strategy.optimizer, "optimizer", strategy.optimizer)  # DeepSpeed wraps torch's
    tensors = list(strategy.unwrapped.parameters())
    for param, state in optimizer.state.items():  # keyed by what it steps: DeepSpeed's master copies
        tensors += [param, *(v for v in state.values() if torch.is_tensor(v))]
    held = {}
    for tensor in map(_local, tensors):
        if tensor.numel():
            held[tensor.data_ptr()] = tensor.nbytes
    return sum(held.values())


def _build(run: Run, model_dir: str):
    """The strategy set up on the model loaded by path, as ``launcher/train.py`` does it."""
    from tunefleet.launcher.model.modeling import load_model, make_optimizer_factory, make_scheduler_factory, param_groups
    from tunefleet.launcher.config import MethodConfig, ModelConfig, TrainConfig
    from tunefleet.strategies.base import StrategyPlan
    from tunefleet.strategies.registry import create

    train = TrainConfig(max_steps=NUM_STEPS, micro_batch_size=run.micro, grad_accum_steps=run.accum,
                        lr=1e-3, weight_decay=0.01, warmup_steps=2, max_grad_norm=1.0)
    strategy = create(StrategyPlan(
        name=run.strategy, world_size=WORLD_SIZE, num_nodes=1, workers_per_node=WORLD_SIZE, use_gpu=run.use_gpu,
        micro_batch_size=run.micro, grad_accum_steps=run.accum, max_grad_norm=train.max_grad_norm,
        activation_checkpointing=run.activation_checkpointing, cpu_offload=run.cpu_offload,
        deepspeed_overrides=ZERO3_OVERRIDES if run.strategy == "deepspeed_zero3" else {},
    ))
    model = load_model(ModelConfig(path=model_dir), MethodConfig(kind=run.method), model_dir,
                       init_context=strategy.model_init_context())
    _reset_lora(model)
    module_keys = sorted(model.state_dict())
    strategy.setup(model, make_optimizer_factory(train), make_scheduler_factory(train), param_groups(model, train))
    return strategy, module_keys


def _train(run: Run, model_dir: str, workdir: Path) -> dict:
    from tunefleet.launcher.objectives.sft import evaluate, train_step

    device = torch.device("cuda", torch.cuda.current_device()) if run.use_gpu else torch.device("cpu")
    strategy, module_keys = _build(run, model_dir)
    checkpoint = str(workdir / "checkpoints" / Run(run.strategy, use_gpu=run.use_gpu).key)
    if run.resume:
        strategy.load(checkpoint)
    losses, grad_norms = [], []
    for step in range(SAVE_AFTER_STEPS if run.resume else 0, NUM_STEPS):
        result = train_step(strategy, _micro_batches(step, run.micro), device)
        losses.append(result.loss)
        grad_norms.append(result.grad_norm)
        if run.saves and step + 1 == SAVE_AFTER_STEPS:
            strategy.save(checkpoint)
    out = {
        "losses": losses, "grad_norms": grad_norms, "module_keys": module_keys,
        "eval_loss": evaluate(strategy, _micro_batches(-1, ROWS_PER_RANK), device),
        "held_bytes": _held_bytes(strategy), "state": strategy.full_state_dict(),
    }
    strategy.teardown()
    return out


def _run_all(model_dir: str, workdir: str, runs: list[Run]) -> dict[str, dict]:
    results = {}
    for run in runs:
        results[run.key] = _train(run, model_dir, Path(workdir))
        dist.barrier()
    return results


# ----------------------------------------------------------------------------- parent side
def _save_tiny_llama(folder: Path) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB_SIZE, max_position_embeddings=64,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict[str, dict]]:
    """Per rank: run key -> what that run returned."""
    root = tmp_path_factory.mktemp("strategies")
    model_dir = _save_tiny_llama(root / "model")
    return run_ranks(_run_all, model_dir, str(root), RUNS, workdir=root / "ranks", timeout_s=480)


def _assert_same_training(got: dict, want: dict) -> None:
    torch.testing.assert_close(got["losses"], want["losses"], rtol=LOSS_RTOL, atol=0)
    torch.testing.assert_close(got["eval_loss"], want["eval_loss"], rtol=LOSS_RTOL, atol=0)
    assert got["state"].keys() == want["state"].keys()
    for key, value in want["state"].items():
        torch.testing.assert_close(got["state"][key], value, rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL,
                                   msg=lambda message, key=key: f"{key}: {message}")


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("strategy", STRATEGIES[1:])
def test_strategy_matches_ddp(results, strategy, method):
    got, want = results[0][Run(strategy, method).key], results[0][Run("ddp", method).key]
    _assert_same_training(got, want)
    torch.testing.assert_close(got["grad_norms"], want["grad_norms"], rtol=LOSS_RTOL, atol=0)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_accumulation_is_invariant(results, strategy):
    whole = results[0][Run(strategy, micro=4, accum=1).key]
    for micro, accum in ((1, 4), (2, 2)):
        _assert_same_training(results[0][Run(strategy, micro=micro, accum=accum).key], whole)


@pytest.mark.parametrize(
    "run",
    [r for r in RUNS if r.activation_checkpointing or r.cpu_offload],
    ids=lambda run: run.key,
)
def test_memory_savers_keep_numerics(results, run):
    _assert_same_training(results[0][run.key], results[0][Run(run.strategy).key])


@pytest.mark.parametrize("strategy", sorted(HELD_BYTES_VS_DDP))
def test_sharding_is_real(results, strategy):
    for rank_results in results:
        ratio = rank_results[Run(strategy).key]["held_bytes"] / rank_results[Run("ddp").key]["held_bytes"]
        assert ratio == pytest.approx(HELD_BYTES_VS_DDP[strategy], abs=0.02), f"{strategy} holds {ratio:.3f}x"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_resume_is_exact(results, strategy):
    resumed, straight = results[0][Run(strategy, resume=True).key], results[0][Run(strategy).key]
    assert resumed["losses"] == straight["losses"][SAVE_AFTER_STEPS:]
    assert resumed["eval_loss"] == straight["eval_loss"]
    assert resumed["state"].keys() == straight["state"].keys()
    assert all(torch.equal(resumed["state"][k], v) for k, v in straight["state"].items())


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_full_state_dict_is_the_modules_on_rank_zero(results, strategy, method):
    got = results[0][Run(strategy, method).key]
    assert sorted(got["state"]) == got["module_keys"]
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in got["state"].values())
    assert results[1][Run(strategy, method).key]["state"] == {}


def test_hsdp_replicates_across_nodes_and_shards_within(request):
    """FSDPStrategy on a fake 2-node x 2-worker group: the mesh and the parameter placements."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunefleet.strategies.base import StrategyPlan
    from tunefleet.strategies.registry import create

    plan = StrategyPlan(name="fsdp", world_size=4, num_nodes=2, workers_per_node=2, micro_batch_size=1,
                        grad_accum_steps=1, hsdp=True)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, vocab_size=32))
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)
    request.addfinalizer(dist.destroy_process_group)
    strategy = create(plan)
    strategy.setup(model, lambda groups: torch.optim.AdamW(groups),
                   lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0),
                   [{"params": list(model.parameters())}])
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert weight.device_mesh.mesh_dim_names == ("replicate", "shard")
    assert tuple(weight.device_mesh.shape) == (2, 2)
    assert weight.placements == (Replicate(), Shard(0))
    assert weight.to_local().shape == (8, 16)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_strategies_match_ddp_on_gpus(tmp_path):
    runs = [Run(s, use_gpu=True) for s in STRATEGIES]
    model_dir = _save_tiny_llama(tmp_path / "model")
    results = run_ranks(_run_all, model_dir, str(tmp_path), runs, workdir=tmp_path / "ranks", backend="nccl")
    want = results[0][runs[0].key]["losses"]
    for run in runs[1:]:
        # cuBLAS picks kernels per shape and may use TF32: compare losses only, loosely.
        torch.testing.assert_close(results[0][run.key]["losses"], want, rtol=1e-4, atol=0)
