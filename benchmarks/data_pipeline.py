"""The data pipeline on the shipped tiny data: tokenization throughput, packing
efficiency with and without packing, and (``--launch``) training tokens/s with
and without packing.

- Tokenization: ``preprocess.encode_source`` (read, format, tokenize with loss
  masks; no cache) on every shipped training file in one process, and on the
  chat file repeated ``--scale`` times with each ``--num-proc`` (processes only
  pay off past a few chunks: each starts a fresh interpreter); rows/s and
  tokens/s are medians over ``--repeats`` runs.
- Packing: for each sft file at ``--seq-len``, the share of real tokens in the
  ``rows x max_seq_len`` slots (``packing_efficiency`` in the cache meta) and in
  the batches the loop actually builds (right-padded to the longest row of each
  micro-batch of ``--micro-batch`` rows, over one epoch of the sampler).
- Training (``--launch``): ``tunefleet launch recipes/tiny/llama-full-ddp.yaml``
  with ``data.packing`` false and true, alternated ``--pairs`` times; the median
  of each run's steady-state ``tokens_per_s`` (real, non-pad tokens).

    python benchmarks/data_pipeline.py [--launch] [--pairs 2]

Prints a markdown table and writes ``docs/benchmarks/data_pipeline.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from tunefleet.launcher.config import DataConfig, DataSource
from tunefleet.launcher.data import batches, packing, preprocess
from tunefleet.launcher.model.modeling import load_tokenizer
from tunefleet.launcher.model.tiny import ensure_tiny_model

REPO = Path(__file__).resolve().parents[1]
TINY_DATA = REPO / "recipes" / "tiny" / "data"
RECIPE = REPO / "recipes" / "tiny" / "llama-full-ddp.yaml"
OUT = REPO / "docs" / "benchmarks" / "data_pipeline.json"
FILES = {  # shipped training files and their formats
    "alpaca_train.jsonl": "alpaca", "chat_train.jsonl": "chat", "text_reference.jsonl": "text",
    "preference/train.jsonl": "preference", "classification/train.csv": "classification",
}
SFT_FILES = ("alpaca_train.jsonl", "chat_train.jsonl", "text_reference.jsonl")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="Tokenization runs per file and num_proc.")
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2], help="data.num_proc values to time.")
    parser.add_argument("--scale", type=int, default=10, help="Copies of chat_train.jsonl for the num_proc runs.")
    parser.add_argument("--seq-len", type=int, default=128, help="data.max_seq_len for the packing figures.")
    parser.add_argument("--micro-batch", type=int, default=8, help="Rows per micro-batch for the batch fill.")
    parser.add_argument("--launch", action="store_true", help="Also time training with and without packing.")
    parser.add_argument("--pairs", type=int, default=2, help="Alternated (unpacked, packed) launch pairs.")
    parser.add_argument("--steps", type=int, default=40, help="Training steps per launch.")
    return parser.parse_args(argv)


def time_encode(tokenizer, name: str, path: Path, fmt: str, num_proc: int, repeats: int) -> dict:
    labels = ["reverse", "uppercase", "sort", "add", "capital"] if fmt == "classification" else None
    source = DataSource(path=str(path), format=fmt)
    cfg = DataConfig(sources=[source], max_seq_len=512, labels=labels, num_proc=num_proc)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        split, counts = preprocess.encode_source(source, cfg, tokenizer)
        times.append(time.perf_counter() - started)
    seconds = statistics.median(times)
    return {"file": name, "format": fmt, "num_proc": num_proc, "rows": counts.read, "tokens": split.num_tokens,
            "seconds": round(seconds, 3), "rows_per_s": round(counts.read / seconds),
            "tokens_per_s": round(split.num_tokens / seconds)}


def tokenization(tokenizer, args) -> list[dict]:
    rows = [time_encode(tokenizer, name, TINY_DATA / name, fmt, 1, args.repeats) for name, fmt in FILES.items()]
    with tempfile.TemporaryDirectory(prefix="tf-bench-data-") as work:
        scaled = Path(work) / "chat_scaled.jsonl"
        scaled.write_text((TINY_DATA / "chat_train.jsonl").read_text() * args.scale)
        rows += [time_encode(tokenizer, f"chat_train.jsonl x{args.scale}", scaled, "chat", num_proc, args.repeats)
                 for num_proc in args.num_proc]
    return rows


def batch_fill(split: batches.TokenizedSplit, micro_batch: int) -> float:
    """Real tokens / padded batch slots over one epoch of the sampler (pad to the longest row of each batch)."""
    lengths = np.diff(np.asarray(split.offsets))
    order = batches.global_batch_indices(len(split), 0, len(split), seed=0)
    micro = [lengths[order[i:i + micro_batch]] for i in range(0, len(order), micro_batch)]
    return float(sum(b.sum() for b in micro) / sum(b.max() * len(b) for b in micro))


def packing_figures(tokenizer, args) -> list[dict]:
    rows = []
    for name in SFT_FILES:
        source = DataSource(path=str(TINY_DATA / name), format=FILES[name])
        plain, _ = preprocess.encode_source(source, DataConfig(sources=[source], max_seq_len=args.seq_len), tokenizer)
        packed = packing.pack(plain, args.seq_len)
        rows.append({
            "file": name, "max_seq_len": args.seq_len, "rows": len(plain), "packed_rows": len(packed),
            "slot_fill_unpacked": round(packing.packing_efficiency(plain, args.seq_len), 4),
            "slot_fill_packed": round(packing.packing_efficiency(packed, args.seq_len), 4),
            "batch_fill_unpacked": round(batch_fill(plain, args.micro_batch), 4),
            "batch_fill_packed": round(batch_fill(packed, args.micro_batch), 4),
        })
    return rows


def launch(packed: bool, steps: int, work: Path) -> float:
    out = work / f"{'packed' if packed else 'plain'}-{time.monotonic_ns()}"
    command = [str(Path(sys.executable).parent / "tunefleet"), "launch", str(RECIPE),
               f"--set=data.packing={str(packed).lower()}", f"--set=output_dir={out}", f"--set=train.max_steps={steps}",
               "--set=checkpoint.export_final=false", "--set=checkpoint.every_steps=null", "--set=data.eval=null",
               "--set=train.eval_every_steps=null", "--set=logging.wandb.mode=disabled", "--set=logging.every_steps=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if result.returncode != 0:
        sys.exit(f"launch failed: {' '.join(command)}\n{result.stderr[-4000:]}")
    return json.loads((out / "summary.json").read_text())["tokens_per_s"]


def training(args) -> dict:
    results: dict[str, list[float]] = {"unpacked": [], "packed": []}
    with tempfile.TemporaryDirectory(prefix="tf-bench-data-") as work:
        for _ in range(args.pairs):
            for packed in (False, True):
                results["packed" if packed else "unpacked"].append(launch(packed, args.steps, Path(work)))
    medians = {name: statistics.median(values) for name, values in results.items()}
    return {"runs_tokens_per_s": results, "median_tokens_per_s": medians,
            "packed_over_unpacked": round(medians["packed"] / medians["unpacked"], 3), "steps": args.steps}


def markdown(result: dict) -> str:
    lines = ["| file | num_proc | rows | tokens | rows/s | tokens/s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['file']} | {r['num_proc']} | {r['rows']:,} | {r['tokens']:,} | {r['rows_per_s']:,} | "
              f"{r['tokens_per_s']:,} |" for r in result["tokenization"]]
    lines += ["", "| file | max_seq_len | rows -> packed rows | slot fill unpacked / packed | "
              "batch fill unpacked / packed |", "|---|---|---|---|---|"]
    lines += [f"| {r['file']} | {r['max_seq_len']} | {r['rows']:,} -> {r['packed_rows']:,} | "
              f"{r['slot_fill_unpacked']:.1%} / {r['slot_fill_packed']:.1%} | "
              f"{r['batch_fill_unpacked']:.1%} / {r['batch_fill_packed']:.1%} |" for r in result["packing"]]
    if "training" in result:
        t = result["training"]
        lines += ["", "| training (tiny:llama, 2 DDP workers) | tokens/s (median) |", "|---|---|",
                  f"| unpacked | {t['median_tokens_per_s']['unpacked']:,.0f} |",
                  f"| packed | {t['median_tokens_per_s']['packed']:,.0f} (x{t['packed_over_unpacked']}) |"]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tokenizer = load_tokenizer(str(ensure_tiny_model("llama")))
    result = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": platform.machine(),
              "cpus": os.cpu_count(), "args": vars(args), "tokenization": tokenization(tokenizer, args),
              "packing": packing_figures(tokenizer, args)}
    if args.launch:
        result["training"] = training(args)
    print(markdown(result))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {OUT.relative_to(REPO)}")


if __name__ == "__main__":
    main()
