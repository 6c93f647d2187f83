"""The hand-written floor for tunefleet's DDP loop: plain torchrun + DDP + AdamW.

Launch with ``torchrun --nproc_per_node 2`` (gloo, ``OMP_NUM_THREADS=1``). It
trains the same model folder on the same token rows as ``tunefleet launch``
would, with the same math, and nothing else: no logging, eval or checkpoints
inside the loop.

Same data, exactly (plain or packed rows): the rows are read from the token cache that tunefleet's
driver writes (``tunefleet.launcher.data.batches.prepare``; ``benchmarks/ddp_vs_torchrun.py``
builds it and passes ``--data-dir``). The global batch of step ``s`` is the same
seeded per-epoch permutation tunefleet samples from, split rank-strided, each
micro-batch right-padded to its longest row. That is the only thing taken from
tunefleet, and it is re-implemented here rather than imported, so none of
tunefleet's loop code is inside the floor's timings.

Same math: next-token cross entropy summed over target tokens and scaled by
``world_size / global_targets`` (the global token mean after DDP averages
gradients), decay on matrices only, AdamW(foreach), linear warm-up then cosine
to 0, grad-norm clipping. Global target and input token counts come from the
data every rank can see, so the floor needs no extra collective per step.

Output: rank 0 writes one JSON line per step to ``--out`` (or stdout):
``step``, ``loss`` (global token mean, reduced once after the loop),
``num_input_tokens`` (global non-pad input tokens), ``step_time_s`` (forward,
backward, all-reduce, clip, optimizer: the region tunefleet's ``step_time_s``
covers), ``iter_time_s`` (the whole loop iteration, batching included) and
``time`` (unix seconds at the end of the step).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModelForCausalLM, AutoTokenizer

IGNORE_INDEX = -100


def parse_args(argv: list[str] | None = None, description: str = __doc__.splitlines()[0]) -> argparse.Namespace:
    """The training knobs; ``trl_sft.py`` takes the same command line."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model-dir", required=True, help="Hugging Face model folder (config, weights, tokenizer).")
    parser.add_argument("--data-dir", required=True, help="tunefleet token cache folder (holds train/*.npy).")
    parser.add_argument("--steps", type=int, default=40, help="Optimizer steps.")
    parser.add_argument("--micro-batch", type=int, default=8, help="Rows per rank per step.")
    parser.add_argument("--lr", type=float, default=3e-3, help="Peak learning rate.")
    parser.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999), help="AdamW betas.")
    parser.add_argument("--eps", type=float, default=1e-8, help="AdamW epsilon.")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay on matrices.")
    parser.add_argument("--warmup-steps", type=int, default=10, help="Linear warm-up steps.")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="Clip the global grad norm (<=0: off).")
    parser.add_argument("--seed", type=int, default=0, help="Data order and torch seed.")
    parser.add_argument("--out", default=None, help="JSON-lines file for rank 0's rows (default stdout).")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- data
class TokenRows:
    """The memory-mapped train split of a tunefleet token cache."""

    def __init__(self, data_dir: str):
        folder = Path(data_dir) / "train"
        layout = json.loads((folder / "split.json").read_text()) if (folder / "split.json").is_file() else {}
        if layout.get("rows_per_example", 1) != 1:
            raise SystemExit(f"{folder}: preference pairs; this loop trains one row per example "
                             "(an instruction/chat/text format)")
        self.input_ids = np.load(folder / "input_ids.npy", mmap_mode="r")
        self.labels = np.load(folder / "labels.npy", mmap_mode="r")
        # Packed rows: positions restart at every document (data.packing=true).
        packed = (folder / "position_ids.npy").is_file()
        self.position_ids = np.load(folder / "position_ids.npy", mmap_mode="r") if packed else None
        self.offsets = np.load(folder / "offsets.npy")
        # Per row: non-pad input tokens, and targets (labels from the row's second token on).
        self.num_inputs = np.diff(self.offsets)
        is_target = np.concatenate([[0], np.cumsum(np.asarray(self.labels) != IGNORE_INDEX)])
        self.num_targets = is_target[self.offsets[1:]] - is_target[self.offsets[:-1] + 1]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        start, end = self.offsets[index], self.offsets[index + 1]
        positions = None if self.position_ids is None else self.position_ids[start:end]
        return self.input_ids[start:end], self.labels[start:end], positions


def global_batch(num_rows: int, step: int, batch_size: int, seed: int) -> np.ndarray:
    """Row indices of step ``step``: consecutive slices of a seeded permutation per epoch."""
    out: list[int] = []
    while len(out) < batch_size:
        epoch, offset = divmod(step * batch_size + len(out), num_rows)
        order = np.random.default_rng([seed, epoch]).permutation(num_rows)
        out.extend(order[offset:offset + batch_size - len(out)].tolist())
    return np.asarray(out, dtype=np.int64)


def collate(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row; padded labels are ignored.

    Packed rows give ``position_ids`` (the pad tail counts from 0, a document of
    its own) and no ``attention_mask``: transformers then builds the per-document
    causal mask from the restarting positions.
    """
    width = max(len(ids) for ids, _, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    position_ids = torch.arange(width).repeat(len(rows), 1)
    for i, (ids, labs, positions) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.from_numpy(ids.astype(np.int64))
        labels[i, :len(labs)] = torch.from_numpy(labs.astype(np.int64))
        attention_mask[i, :len(ids)] = 1
        if positions is not None:
            position_ids[i, :len(ids)] = torch.from_numpy(positions.astype(np.int64))
            position_ids[i, len(ids):] = torch.arange(width - len(ids))
    if rows[0][2] is not None:
        return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# --------------------------------------------------------------------------- model
def build(args: argparse.Namespace) -> tuple[DistributedDataParallel, torch.optim.Optimizer, object]:
    """DDP model, AdamW (decay on matrices only) and a warm-up + cosine schedule."""
    module = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    module.train()
    model = DistributedDataParallel(module, gradient_as_bucket_view=True)
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=tuple(args.betas), eps=args.eps, foreach=True)

    def multiplier(step: int) -> float:
        if step < args.warmup_steps:
            return (step + 1) / (args.warmup_steps + 1)
        progress = min((step - args.warmup_steps) / max(args.steps - args.warmup_steps, 1), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


# --------------------------------------------------------------------------- loop
def train(args: argparse.Namespace) -> list[dict]:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)
    pad_id = AutoTokenizer.from_pretrained(args.model_dir).pad_token_id
    data = TokenRows(args.data_dir)
    model, optimizer, scheduler = build(args)
    params = [p for p in model.parameters() if p.requires_grad]
    rows, local_losses = [], []
    for step in range(args.steps):
        iter_started = time.perf_counter()
        indices = global_batch(len(data), step, args.micro_batch * world_size, args.seed)
        batch = collate([data.row(i) for i in indices[rank::world_size]], pad_id)
        global_targets = int(data.num_targets[indices].sum())
        step_started = time.perf_counter()
        loss = loss_sum(model, batch)
        (loss * (world_size / max(global_targets, 1))).backward()
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ended = time.perf_counter()
        rows.append({"step": step + 1, "time": round(time.time(), 3), "step_time_s": ended - step_started,
                     "iter_time_s": ended - iter_started, "num_input_tokens": int(data.num_inputs[indices].sum()),
                     "num_targets": global_targets})
        local_losses.append(loss.item())
    rows = with_global_losses(rows, local_losses)
    rows[-1].update(memory_per_rank(model.module, optimizer))
    return rows


def memory_per_rank(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, list[int]]:
    """Peak RSS and held bytes (parameters, gradients, optimizer state) of every rank, after the loop.

    Counted by tunefleet's own accounting, outside the timed loop, so every
    system in ``benchmarks/peers.py`` reports the same quantity.
    """
    from types import SimpleNamespace

    from tunefleet.launcher.training.throughput import held_bytes, memory_stats

    mine = [memory_stats(torch.device("cpu"))["peak_rss_bytes"],
            sum(held_bytes(SimpleNamespace(model=module, optimizer=optimizer)).values())]
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return {"peak_rss_bytes_per_rank": [m[0] for m in every], "held_bytes_per_rank": [m[1] for m in every]}


def with_global_losses(rows: list[dict], local_losses: list[float]) -> list[dict]:
    """One all-reduce after the loop turns per-rank loss sums into global token means."""
    sums = torch.tensor(local_losses, dtype=torch.float64)
    dist.all_reduce(sums)
    totals = sums.tolist()
    return [{**row, "loss": total / max(row["num_targets"], 1)} for row, total in zip(rows, totals, strict=True)]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    dist.init_process_group("gloo")
    try:
        rows = train(args)
        if dist.get_rank() == 0:
            lines = "".join(json.dumps(row) + "\n" for row in rows)
            if args.out:
                Path(args.out).write_text(lines)
            else:
                sys.stdout.write(lines)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
