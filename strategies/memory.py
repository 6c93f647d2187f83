"""Per-device memory of each strategy, from parameter counts alone.

Model state follows the ZeRO paper (Rajbhandari et al. 2020, "ZeRO: Memory
Optimizations Toward Training Trillion Parameter Models", section 3.1): mixed-
precision AdamW holds 16 bytes per parameter (2 for 16-bit weights, 2 for
16-bit gradients, 12 for the fp32 master copy and the two fp32 moments). ZeRO-2
shards gradients and optimizer state (2P + 14P/N per device), ZeRO-3 and FSDP
shard everything (16P/N). Where the real implementations differ from the paper
the estimate follows the implementation, because that is what a run holds:

- torch AdamW (``ddp``, ``fsdp``) keeps no master copy: weights, gradients and
  both moments are all in the stored dtype (fp32: 4 + 4 + 8 = 16 bytes).
- DeepSpeed always clones a master partition, also in fp32 training (then
  ZeRO-2 holds 4P + 16P/N and ZeRO-3 20P/N), and ZeRO-3 keeps parameters of at
  most ``stage3_param_persistence_threshold`` elements whole on every rank.

Activations use Korthikanti et al. 2022 ("Reducing Activation Recomputation in
Large Transformer Models", eq. 1, no tensor or sequence parallelism): a layer
keeps ``s*b*h*(34 + 5*a*s/h)`` bytes in 16-bit. The ``5*a*s/h`` term is the
attention score matrix, which fused kernels (sdpa, flash) never store, so only
eager attention pays it. fp32 doubles every element. With activation
checkpointing a layer keeps only its 16/32-bit input, and one layer at a time
is recomputed in full. The logits (and the fp32 log-softmax and its gradient
that the loss keeps) come on top: ``s*b*V*(c + 8)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

GiB = 1024**3
# DeepSpeed's defaults (deepspeed/runtime/zero/config.py); tunefleet does not change them.
ZERO3_PERSISTENCE_THRESHOLD = 100_000
DEEPSPEED_REDUCE_BUCKET_ELEMENTS = 500_000_000
DEEPSPEED_PREFETCH_BUCKET_ELEMENTS = 50_000_000
# nf4 with double quantization (QLoRA paper, section 3): 4 bits per weight, an 8-bit
# absmax per block of 64 and an fp32 constant per 256 blocks: 4.127 bits per weight.
QLORA_BYTES_PER_PARAM = (4 + 8 / 64 + 32 / (64 * 256)) / 8
ADAM_MOMENTS = 2
ZERO_STAGES: dict[str, Literal[2, 3]] = {"deepspeed_zero2": 2, "deepspeed_zero3": 3}

# Every adapter kind plans like LoRA: a frozen base in its loaded dtype, fp32 adapters.
Method = Literal["full", "lora", "qlora", "ia3", "prefix_tuning", "prompt_tuning"]
MixedPrecision = Literal["no", "bf16", "fp16"]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelShape(_Frozen):
    """Parameter counts and dimensions of a model, read from its meta-device build."""

    num_params: int = Field(ge=1, description="All parameters, tied ones counted once.")
    num_trainable_params: int = Field(ge=0, description="Parameters the optimizer updates (all, or the adapters).")
    num_quantized_params: int = Field(0, ge=0, description="Frozen weights stored in 4 bits (QLoRA's base Linears).")
    num_persistent_params: int = Field(
        ge=0, description="Parameters small enough that ZeRO-3 keeps them whole on every rank."
    )
    num_root_params: int = Field(ge=0, description="Parameters outside the decoder layers (embeddings, head, norm).")
    num_largest_layer_params: int = Field(ge=0, description="Parameters of the largest decoder layer.")
    num_largest_module_params: int = Field(
        ge=0, description="Direct parameters of the largest single module (ZeRO-3 gathers module by module)."
    )
    num_layers: int = Field(ge=1, description="Decoder layers.")
    hidden_size: int = Field(ge=1, description="Model width h.")
    num_heads: int = Field(ge=1, description="Attention heads a.")
    vocab_size: int = Field(ge=1, description="Vocabulary size V (logits per token).")


class TrainingSetup(_Frozen):
    """The numerics and batch shape a run trains with."""

    method: Method = Field(description="Full fine-tuning, LoRA on a 4-bit base (qlora), or another peft adapter.")
    objective: Literal["sft", "dpo", "reward", "grpo", "ppo"] = Field(
        description="DPO and reward models forward chosen and rejected rows together; DPO, GRPO and PPO with full "
        "fine-tuning also keep a frozen reference copy of the starting weights on every rank."
    )
    world_size: int = Field(ge=1, description="Data-parallel ranks N that shard state.")
    weight_bytes: Literal[2, 4] = Field(description="Bytes per weight as loaded (model.dtype).")
    mixed_precision: MixedPrecision = Field(description="16-bit compute on top of the stored weights.")
    seq_len: int = Field(ge=1, description="Tokens per row s.")
    micro_batch_size: int = Field(ge=1, description="Rows per forward pass b.")
    activation_checkpointing: bool = Field(description="Keep only layer inputs; recompute in backward.")
    eager_attention: bool = Field(description="Attention materializes the s*s score matrix (eager kernel).")
    causal_lm: bool = Field(description="The head produces vocabulary logits for every token.")

    @property
    def compute_bytes(self) -> int:
        return 2 if self.mixed_precision != "no" or self.weight_bytes == 2 else 4


class MemoryEstimate(_Frozen):
    """Bytes one rank holds for one strategy; the first five parts live on the device."""

    strategy: str = Field(description="Registry name of the strategy.")
    cpu_offload: bool = Field(description="State moved to host memory (fsdp, ZeRO).")
    params_bytes: int = Field(description="Parameters resident on the device (with a DPO reference copy).")
    grads_bytes: int = Field(description="Gradients resident on the device.")
    optimizer_bytes: int = Field(description="Optimizer state (moments and master weights) on the device.")
    activations_bytes: int = Field(description="Activations kept for backward, at the peak.")
    buffers_bytes: int = Field(description="All-gathered parameters and communication buckets, at the peak.")
    offloaded_bytes: int = Field(description="Model state kept in host memory instead of on the device.")
    load_bytes: int = Field(description="Host memory while loading the weights (before sharding/moving).")

    @property
    def model_state_bytes(self) -> int:
        """Parameters, gradients and optimizer state wherever they live."""
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes + self.offloaded_bytes

    @property
    def device_bytes(self) -> int:
        return (
            self.params_bytes + self.grads_bytes + self.optimizer_bytes + self.activations_bytes + self.buffers_bytes
        )


@dataclass(frozen=True)
class _State:
    """Bytes of model state one rank holds on its device, by part."""

    params: float
    grads: float
    optimizer: float


def frozen_param_bytes(shape: ModelShape, setup: TrainingSetup, *, float_bytes: int | None = None) -> float:
    """Bytes of the frozen base: QLoRA's 4-bit Linears, the other weights at ``float_bytes``.

    By default those are fp32 for QLoRA (peft's ``prepare_model_for_kbit_training``
    upcasts them) and the loaded dtype otherwise.
    """
    num_frozen = shape.num_params - shape.num_trainable_params
    quantized = shape.num_quantized_params if setup.method == "qlora" else 0
    if float_bytes is None:
        float_bytes = 4 if setup.method == "qlora" else setup.weight_bytes
    return quantized * QLORA_BYTES_PER_PARAM + (num_frozen - quantized) * float_bytes


def trainable_bytes_per_param(setup: TrainingSetup) -> int:
    """Adapters stay fp32 (peft's ``autocast_adapter_dtype``); full fine-tuning trains the loaded weights."""
    return setup.weight_bytes if setup.method == "full" else 4


def torch_adamw_state(
    shape: ModelShape, setup: TrainingSetup, *, sharded: bool, cpu_offload: bool
) -> tuple[_State, float]:
    """ddp (replicated) and fsdp (sharded /N): weights, gradients and moments in one dtype.

    Returns the state on the device and the bytes offloaded to the host.
    """
    if cpu_offload and not sharded:
        raise ValueError("ddp keeps its state on the device; cpu_offload needs fsdp or a ZeRO stage")
    shards = setup.world_size if sharded else 1
    trainable = shape.num_trainable_params * trainable_bytes_per_param(setup)
    state = _State(
        params=(frozen_param_bytes(shape, setup) + trainable) / shards,
        grads=trainable / shards,
        optimizer=ADAM_MOMENTS * trainable / shards,
    )
    if cpu_offload:
        return _State(params=0, grads=0, optimizer=0), state.params + state.grads + state.optimizer
    return state, 0.0


def deepspeed_state(
    shape: ModelShape, setup: TrainingSetup, *, stage: Literal[2, 3], cpu_offload: bool
) -> tuple[_State, float]:
    """ZeRO-2/3: a training copy (16-bit with mixed precision), a sharded master copy and moments.

    Returns the state on the device and the bytes offloaded to the host, where
    DeepSpeed also keeps master-dtype gradients of the partition (and, ZeRO-2, a
    16-bit staging copy of it).
    """
    num_ranks, num_trainable = setup.world_size, shape.num_trainable_params
    mixed = setup.mixed_precision != "no"
    train_bytes = 2 if mixed else trainable_bytes_per_param(setup)
    frozen = frozen_param_bytes(shape, setup, float_bytes=2 if mixed else None)  # the engine casts to 16-bit
    params = frozen + train_bytes * num_trainable
    grads = train_bytes * num_trainable / num_ranks
    master = (4 if mixed else train_bytes) * num_trainable / num_ranks
    optimizer = (1 + ADAM_MOMENTS) * master
    if stage == 2:
        if cpu_offload:
            return _State(params=params, grads=0, optimizer=0), optimizer + master + grads
        return _State(params=params, grads=grads, optimizer=optimizer), 0.0
    persistent = shape.num_persistent_params * (2 if mixed else setup.weight_bytes)
    if cpu_offload:
        return _State(params=persistent, grads=0, optimizer=0), params / num_ranks + optimizer + master
    return _State(params=params / num_ranks + persistent, grads=grads, optimizer=optimizer), 0.0


def activation_bytes(shape: ModelShape, setup: TrainingSetup) -> float:
    """Activations kept for backward at the peak (see the module docstring)."""
    s, h, c = setup.seq_len, shape.hidden_size, setup.compute_bytes
    b = setup.micro_batch_size * (2 if setup.objective in ("dpo", "reward") else 1)  # pairs: chosen and rejected
    per_token_factor = 34 + (5 * shape.num_heads * s / h if setup.eager_attention else 0)
    per_layer = s * b * h * per_token_factor * c / 2
    logits = s * b * shape.vocab_size * (c + 8) if setup.causal_lm else 0
    if setup.activation_checkpointing:
        return shape.num_layers * s * b * h * c + per_layer + logits
    return shape.num_layers * per_layer + logits


def buffer_bytes(strategy: str, shape: ModelShape, setup: TrainingSetup) -> float:
    """Transient full parameters and communication buckets at the peak.

    FSDP2 keeps the root unit (embeddings, head) gathered from forward to
    backward and gathers a layer while prefetching the next; ZeRO-3 gathers
    module by module plus a prefetch bucket; both ZeRO stages reduce gradients
    through a bucket of up to ``reduce_bucket_size`` elements.
    """
    mixed = setup.mixed_precision != "no"
    gathered_bytes = 2 if mixed else setup.weight_bytes
    bucket = min(DEEPSPEED_REDUCE_BUCKET_ELEMENTS, shape.num_trainable_params) * (
        2 if mixed else trainable_bytes_per_param(setup)
    )
    if strategy == "fsdp":
        return (shape.num_root_params + 2 * shape.num_largest_layer_params) * gathered_bytes
    if strategy == "deepspeed_zero2":
        return bucket
    if strategy == "deepspeed_zero3":
        prefetch = min(DEEPSPEED_PREFETCH_BUCKET_ELEMENTS, shape.num_params)
        return (shape.num_largest_module_params + prefetch) * gathered_bytes + bucket
    return 0.0


def load_bytes(strategy: str, shape: ModelShape, setup: TrainingSetup) -> float:
    """Host memory while ``from_pretrained`` reads the weights: the whole model, except under
    ZeRO-3, which partitions each layer as it loads."""
    whole = shape.num_params * setup.weight_bytes
    if strategy == "deepspeed_zero3":
        return whole / setup.world_size + shape.num_largest_layer_params * setup.weight_bytes
    return whole


def estimate(strategy: str, shape: ModelShape, setup: TrainingSetup, *, cpu_offload: bool = False) -> MemoryEstimate:
    """What one rank of ``strategy`` holds, on the device and on the host."""
    if strategy in ("ddp", "fsdp"):
        state, offloaded = torch_adamw_state(shape, setup, sharded=strategy == "fsdp", cpu_offload=cpu_offload)
    elif strategy in ZERO_STAGES:
        state, offloaded = deepspeed_state(shape, setup, stage=ZERO_STAGES[strategy], cpu_offload=cpu_offload)
    else:
        raise ValueError(f"no memory model for strategy {strategy!r}")
    keeps_copy = setup.objective in ("dpo", "grpo", "ppo") and setup.method == "full"  # the frozen reference
    reference = shape.num_params * setup.weight_bytes if keeps_copy else 0
    return MemoryEstimate(
        strategy=strategy,
        cpu_offload=cpu_offload,
        params_bytes=round(state.params + reference),
        grads_bytes=round(state.grads),
        optimizer_bytes=round(state.optimizer),
        activations_bytes=round(activation_bytes(shape, setup)),
        buffers_bytes=round(buffer_bytes(strategy, shape, setup)),
        offloaded_bytes=round(offloaded),
        load_bytes=round(load_bytes(strategy, shape, setup)),
    )
