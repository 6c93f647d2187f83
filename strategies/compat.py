"""Which (strategy, method, hardware) combinations are known not to work.

Each rule below rejects a combination only because it was seen to fail (or to
do silently nothing) on this project's CPU test machine, or because a library
documents it as unsupported; the comment on each rule says which. Everything
else is allowed: on CPU (gloo, bitsandbytes' CPU backend) every strategy was
checked to train LoRA and QLoRA with and without ``cpu_offload``, in fp32 and
bf16, and QLoRA gave the same losses under ddp, fsdp, deepspeed_zero2 and
deepspeed_zero3 (torch 2.13, deepspeed 0.19.8, bitsandbytes 0.50.2, peft 0.21.2).
IA3, prefix tuning and prompt tuning trained under ddp, fsdp and deepspeed_zero3 on
2 CPU ranks, and prefix/prompt tuning gave the same adapters as under ddp (fsdp bit
for bit, ZeRO-3 within 2.4e-7), so no method rule is needed for them.
"""

from __future__ import annotations


def check_compatibility(
    strategy_name: str,
    method_kind: str,
    *,
    use_gpu: bool,
    cpu_offload: bool,
    mixed_precision: str,
    unfreeze_schedule: bool = False,
) -> list[str]:
    """User-facing problems with this combination; each names the key to change and an alternative.

    ``unfreeze_schedule``: the recipe sets ``train.unfreeze_schedule`` (gradual unfreezing).
    """
    problems = []
    if cpu_offload and strategy_name == "ddp":
        # Not a library failure: DDP keeps everything on the device, so the setting
        # would silently do nothing (STYLE practice 9).
        problems.append(
            "parallelism.cpu_offload has no effect with strategy ddp; use strategy fsdp, "
            "deepspeed_zero2 or deepspeed_zero3 to offload, or set parallelism.cpu_offload: false"
        )
    if mixed_precision == "fp16" and strategy_name in ("fsdp", "ddp"):
        # torch's AMP documentation requires gradient scaling for fp16 (small gradients
        # underflow); the fsdp strategy does not scale the loss. DeepSpeed does.
        problems.append(
            f"parallelism.mixed_precision fp16 is not supported with strategy {strategy_name} (no loss scaling); "
            "use mixed_precision bf16, or strategy deepspeed_zero3 for fp16"
        )
    if method_kind == "qlora" and strategy_name == "fsdp" and use_gpu:
        # bitsandbytes documents that FSDP shards only floating-point storage and that
        # FSDP-QLoRA needs bnb_4bit_quant_storage set to a float dtype; tunefleet loads
        # 4-bit weights with the default uint8 storage. accelerate#3983 reports FSDP2 +
        # uint8 Params4bit on GPU crashing or training silently wrong. (On CPU, torch
        # 2.13's FSDP2 sharded the uint8 weights and trained exactly like DDP, so CPU
        # runs are allowed.)
        problems.append(
            "method.kind qlora cannot shard its 4-bit base with strategy fsdp on GPUs; use strategy "
            "ddp or deepspeed_zero2, or method.kind lora"
        )
    if unfreeze_schedule and strategy_name in ("deepspeed_zero2", "deepspeed_zero3"):
        # Gradual unfreezing flips requires_grad on parameters the optimizer already holds. On CPU
        # (2 ranks, gloo) ddp and fsdp left a scheduled layer bit-for-bit unchanged until its step,
        # while under deepspeed_zero2 and deepspeed_zero3 it changed from the first step: the engine
        # builds its partitions and gradient hooks once and still steps (and weight-decays) them.
        problems.append(
            f"train.unfreeze_schedule does not keep layers frozen with strategy {strategy_name}; use "
            "strategy ddp or fsdp, or remove train.unfreeze_schedule"
        )
    return problems


def deepspeed_env(use_gpu: bool) -> dict[str, str]:
    """Environment for a process that may import DeepSpeed: without a GPU, name the CPU accelerator outright
    (DeepSpeed otherwise probes for one and warns on every import)."""
    return {} if use_gpu else {"DS_ACCELERATOR": "cpu"}
