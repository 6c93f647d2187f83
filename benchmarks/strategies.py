"""Tokens/s and per-rank held bytes (parameters + gradients + optimizer state)
of every strategy at 2 workers, full fine-tuning and LoRA, on a ~100M Llama.

    python benchmarks/strategies.py [--model tiny:llama-100m] [--steps 5] [--out docs/benchmarks/strategies.json]

Runs go through `tunefleet launch` on the embedded Ray, one after another in
one invocation; tokens/s is the median over steps after the first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TUNEFLEET = str(Path(sys.executable).parent / "tunefleet")
STRATEGIES = ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3")
RECIPES = {"full": "llama-full-ddp.yaml", "lora": "llama-lora-ddp.yaml"}


def run(strategy: str, method: str, args, work: Path) -> dict:
    out = work / f"{strategy}-{method}"
    cmd = [TUNEFLEET, "launch", str(REPO / "recipes" / "tiny" / RECIPES[method]), f"--set=output_dir={out}",
           f"--set=model.path={args.model}", f"--set=parallelism.strategy={strategy}",
           f"--set=train.max_steps={args.steps}", "--set=train.micro_batch_size=2", "--set=train.warmup_steps=0",
           "--set=data.eval=null", "--set=train.eval_every_steps=null", "--set=checkpoint.every_steps=null",
           "--set=checkpoint.export_final=false", "--set=logging.wandb.mode=disabled", "--set=logging.every_steps=1"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{strategy}/{method} failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    return {"strategy": strategy, "method": method,
            "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in train[1:]), 1),
            "held_mib_per_rank": [round(b / 2**20, 1) for b in train[-1]["held_bytes_per_rank"]],
            "peak_rss_mib_per_rank": [round(b / 2**20) for b in train[-1]["peak_rss_bytes_per_rank"]],
            "mfu": round(statistics.median(r["mfu"] for r in train[1:]), 4)}


def render(results: list[dict]) -> str:
    ddp = {r["method"]: r for r in results if r["strategy"] == "ddp"}
    lines = ["| method | strategy | tokens/s | held MiB per rank | held vs ddp | peak RSS MiB per rank | MFU |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = max(r["held_mib_per_rank"]) / max(ddp[r["method"]]["held_mib_per_rank"])
        lines.append(f"| {r['method']} | {r['strategy']} | {r['tokens_per_s']:,.0f} | "
                     f"{', '.join(map(str, r['held_mib_per_rank']))} | {ratio:.2f} | "
                     f"{', '.join(map(str, r['peak_rss_mib_per_rank']))} | {r['mfu']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny:llama-100m")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "strategies.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tf-bench-strategies-"))
    results = [run(s, m, args, work) for m in RECIPES for s in STRATEGIES]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "steps": args.steps, "results": results}, indent=2) + "\n")
    print(render(results))


if __name__ == "__main__":
    main()
