"""The peer: TRL's ``SFTTrainer`` on the same packed rows, for ``benchmarks/peers.py``.

Launch with ``accelerate launch --multi_gpu --num_processes 2 --num_machines 1
--mixed_precision no`` (on CPU that starts 2 gloo ranks; ``--cpu`` starts one)
and ``OMP_NUM_THREADS=1``.

Same data: the packed rows of tunefleet's token cache (``--data-dir``), in the
order tunefleet and ``torchrun_ddp.py`` train them: the dataset is laid out so
that the Trainer's sequential sampler, sharded by Accelerate (rank r takes
micro-batches r, r + world_size, ...), hands every rank at step s the same rows
tunefleet's rank-strided split of global batch s gives it. The batches are the
floor's (``torchrun_ddp.collate``: right-padded, ``position_ids`` restarting per
document, no attention mask), so the model computes the same per-document mask.
Packing is done once, before training, by one packer for every system, so the
tokens of every step are identical and tokens/s and step-1 losses compare.

Same math: SFTTrainer's own loss path (its fused, chunked LM head, entropy and
token-accuracy metrics included: what a user gets), the global token mean,
AdamW (torch, decay on matrices), cosine schedule, grad clipping; the defaults
that would change the work (gradient checkpointing, bf16, fused AdamW, DDP's
search for unused parameters) are off.

Output: rank 0 writes one JSON line per step to ``--out`` with ``step``,
``time`` (unix seconds at the end of the optimizer step), ``loss``,
``num_input_tokens``; the last line adds ``peak_rss_bytes_per_rank`` and
``held_bytes_per_rank`` (parameters, gradients and optimizer state, after the
optimizer step: what tunefleet's metrics and the floor report).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torchrun_ddp
from datasets import Dataset
from torchrun_ddp import TokenRows, collate, global_batch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The floor's arguments (``torchrun_ddp.parse_args``): both take the same command line."""
    return torchrun_ddp.parse_args(argv, description=__doc__.splitlines()[0])


def step_ordered_rows(data: TokenRows, args: argparse.Namespace, world_size: int) -> tuple[Dataset, list[int]]:
    """Rows in the order a sequential, Accelerate-sharded sampler feeds them; global tokens per step."""
    order, tokens = [], []
    for step in range(args.steps):
        indices = global_batch(len(data), step, args.micro_batch * world_size, args.seed)
        for rank in range(world_size):
            order.extend(indices[rank::world_size].tolist())
        tokens.append(int(data.num_inputs[indices].sum()))
    columns = {"input_ids": [], "labels": [], "position_ids": []}
    for index in order:
        ids, labels, positions = data.row(index)
        columns["input_ids"].append(ids.tolist())
        columns["labels"].append(labels.tolist())
        columns["position_ids"].append(positions.tolist() if positions is not None else list(range(len(ids))))
    return Dataset.from_dict(columns), tokens


class StepRecorder(TrainerCallback):
    """Wall time at the end of every optimizer step, the logged loss, and memory after the last step."""

    def __init__(self, tokens_per_step: list[int]):
        self.tokens_per_step = tokens_per_step
        self.rows: list[dict] = []
        self.losses: dict[int, float] = {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = state.global_step
        self.rows.append({"step": step, "time": round(time.time(), 3),
                          "num_input_tokens": self.tokens_per_step[step - 1]})
        if step == state.max_steps:
            self.rows[-1].update(memory_per_rank(model, optimizer))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses[state.global_step] = logs["loss"]


def memory_per_rank(model: torch.nn.Module, optimizer) -> dict[str, list[int]]:
    """Peak RSS and held bytes of every rank, by tunefleet's accounting (as the floor does)."""
    from tunefleet.launcher.training.throughput import held_bytes, memory_stats

    mine = [memory_stats(torch.device("cpu"))["peak_rss_bytes"],
            sum(held_bytes(SimpleNamespace(model=model, optimizer=optimizer)).values())]
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return {"peak_rss_bytes_per_rank": [m[0] for m in every], "held_bytes_per_rank": [m[1] for m in every]}


def sft_config(args: argparse.Namespace, output_dir: str) -> SFTConfig:
    """Every knob that changes the work set to what tunefleet and the floor do."""
    return SFTConfig(
        output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=1, learning_rate=args.lr, adam_beta1=args.betas[0], adam_beta2=args.betas[1],
        adam_epsilon=args.eps, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
        lr_scheduler_type="cosine", max_grad_norm=args.max_grad_norm if args.max_grad_norm > 0 else 0.0,
        optim="adamw_torch", seed=args.seed, data_seed=args.seed, use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, ddp_backend="gloo", dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # the default (True without checkpointing) adds a graph walk per step
        train_sampling_strategy="sequential", packing=False,  # the rows are packed already
        dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False,
        logging_steps=1, report_to="none", save_strategy="no", eval_strategy="no", disable_tqdm=True,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.out is None:
        raise SystemExit("--out is required: the JSON-lines file for rank 0's rows")
    torch.manual_seed(args.seed)
    config = sft_config(args, str(Path(args.out).with_suffix("")) + "-trainer")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # set by accelerate launch
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    data = TokenRows(args.data_dir)
    dataset, tokens_per_step = step_ordered_rows(data, args, world_size)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    recorder = StepRecorder(tokens_per_step)

    def data_collator(examples: list[dict]) -> dict[str, torch.Tensor]:
        rows = [(np.asarray(e["input_ids"]), np.asarray(e["labels"]), np.asarray(e["position_ids"]))
                for e in examples]
        return collate(rows, tokenizer.pad_token_id)

    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         data_collator=data_collator, callbacks=[recorder])
    trainer.train()
    if trainer.accelerator.is_main_process:
        rows = [{**row, "loss": recorder.losses.get(row["step"])} for row in recorder.rows]
        Path(args.out).write_text("".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    main()
