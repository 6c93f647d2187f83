"""The plain PyTorch loop that tunefleet is measured against on a GPU (benchmarks/gpu.py).

One process, one GPU, no launcher: the model folder loaded with transformers (SDPA), bf16 autocast
over fp32 master weights, ``AdamW(fused=True)``, and exactly the rows tunefleet trains on at
world size 1 (``batches.rank_micro_batches`` over the same token cache), the loss averaged over target
tokens. Packed rows are fed as plain causal rows (no ``position_ids``, no document mask): the
fastest attention a row can get, and what a hand-written loop usually does.

Prints one JSON line per step ({"step", "loss", "step_time_s", "tokens"}) and a final
{"first_step_s": seconds from process start to the end of step 1, "peak_device_bytes": ...}.
"""

from __future__ import annotations

import time

STARTED = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402

from tunefleet.launcher.data import batches  # noqa: E402
from tunefleet.launcher.model.inputs import IGNORE_INDEX  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model folder")
    parser.add_argument("--data-dir", required=True, help="tunefleet's token cache folder (train split)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = torch.device("cuda", 0)
    torch.manual_seed(args.seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32,
                                                              attn_implementation="sdpa").to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=True)
    split = batches.open_split(Path(args.data_dir), "train")
    for step in range(args.steps):
        (batch,) = batches.rank_micro_batches(split, step, rank=0, world_size=1, micro_batch_size=args.micro_batch_size,
                                           grad_accum_steps=1, seed=args.seed, pad_id=0)
        input_ids = batch["input_ids"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=input_ids, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                               ignore_index=IGNORE_INDEX)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(loss)  # the step's only host sync, as in tunefleet
        step_time_s = time.perf_counter() - started
        tokens = int(batch["attention_mask"].sum())
        print(json.dumps({"step": step + 1, "loss": loss_value, "step_time_s": step_time_s, "tokens": tokens}),
              flush=True)
        if step == 0:
            first_step_s = time.time() - STARTED
    print(json.dumps({"first_step_s": first_step_s, "peak_device_bytes": torch.cuda.max_memory_allocated(device)}),
          flush=True)


if __name__ == "__main__":
    main()
