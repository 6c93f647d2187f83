"""Tokens/s and per-rank held bytes (parameters + gradients + optimizer state)
of every strategy at 2 workers, full fine-tuning and LoRA, on a ~100M Llama.

    python benchmarks/strategies.py [--model tiny:llama-100m] [--steps 5] [--rounds 2] [--code-ref HEAD]

Runs go through `tunefleet launch` on the embedded Ray, one after another in
one invocation, on a copy of the code taken at the start (see frozen.py);
tokens/s is the median over steps after the first, per run; the table shows
every round (``--rounds`` sweeps, in turn) and their median. The JSON is
rewritten after every run, so an interrupted sweep keeps what finished; a
failed run is recorded with its error and the sweep goes on. SIGTERM stops the
current launch cleanly.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from frozen import freeze_code, load_avg, provenance

REPO = Path(__file__).resolve().parents[1]
TUNEFLEET = str(Path(sys.executable).parent / "tunefleet")
STRATEGIES = ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3")
RECIPES = {"full": "llama-full-ddp.yaml", "lora": "llama-lora-ddp.yaml"}


def run(strategy: str, method: str, round_: int, args, recipes: Path, work: Path) -> dict:
    out = work / f"{strategy}-{method}-{round_}"
    cmd = [TUNEFLEET, "launch", str(recipes / RECIPES[method]), f"--set=output_dir={out}",
           f"--set=model.path={args.model}", f"--set=parallelism.strategy={strategy}",
           f"--set=train.max_steps={args.steps}", "--set=train.micro_batch_size=2", "--set=train.warmup_steps=0",
           "--set=data.eval=null", "--set=train.eval_every_steps=null", "--set=checkpoint.every_steps=null",
           "--set=checkpoint.export_final=false", "--set=logging.wandb.mode=disabled", "--set=logging.every_steps=1"]
    started, load_before = time.time(), load_avg()
    log = work / f"{strategy}-{method}-{round_}.log"
    with log.open("w") as handle, subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT) as launch:
        try:
            returncode = launch.wait()
        except BaseException:
            launch.terminate()  # SIGTERM: the driver stops the workers and shuts its Ray down
            launch.wait(timeout=120)
            raise
    info = {"strategy": strategy, "method": method, "round": round_, "wall_s": round(time.time() - started, 1),
            "load_avg_before": load_before, "load_avg_after": load_avg()}
    if returncode != 0:
        return {**info, "error": log.read_text()[-3000:]}
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    return {**info,
            "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in train[1:]), 1),
            "step_time_s": [round(r["step_time_s"], 2) for r in train],
            "held_bytes_per_rank": train[-1]["held_bytes_per_rank"],
            "held_mib_per_rank": [round(b / 2**20, 1) for b in train[-1]["held_bytes_per_rank"]],
            "peak_rss_mib_per_rank": [round(b / 2**20) for b in train[-1]["peak_rss_bytes_per_rank"]],
            "mfu": round(statistics.median(r["mfu"] for r in train[1:]), 4),
            "losses": [round(r["loss"], 4) for r in train]}


def render(results: list[dict]) -> str:
    """One row per (method, strategy): tokens/s of each round and their median; held bytes are exact."""
    lines = ["| method | strategy | tokens/s per round | tokens/s median | held MiB per rank | held vs ddp "
             "| peak RSS MiB per rank | load avg (1 min) per round |", "|---|---|---|---:|---|---:|---|---|"]
    ddp_held = {r["method"]: max(r["held_bytes_per_rank"]) for r in results
                if r["strategy"] == "ddp" and "error" not in r}
    for method, strategy in dict.fromkeys((r["method"], r["strategy"]) for r in results):
        runs = [r for r in results if (r["method"], r["strategy"]) == (method, strategy)]
        ok = [r for r in runs if "error" not in r]
        speeds = ", ".join(f"{r['tokens_per_s']:,.0f}" if "error" not in r else "failed" for r in runs)
        loads = ", ".join(f"{r['load_avg_before'][0]:.1f}-{r['load_avg_after'][0]:.1f}" for r in runs)
        if not ok:
            lines.append(f"| {method} | {strategy} | {speeds} | | | | | {loads} |")
            continue
        held = ok[-1]["held_bytes_per_rank"]
        ratio = f"{max(held) / ddp_held[method]:.3f}" if method in ddp_held else "-"
        lines.append(f"| {method} | {strategy} | {speeds} | {statistics.median(r['tokens_per_s'] for r in ok):,.0f} "
                     f"| {', '.join(f'{b / 2**20:.1f}' for b in held)} | {ratio} "
                     f"| {', '.join(map(str, ok[-1]['peak_rss_mib_per_rank']))} | {loads} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny:llama-100m")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="Sweeps over every (method, strategy), in turn.")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--methods", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "strategies.json")
    parser.add_argument("--code-ref", help="Run the code of this git commit instead of the working tree.")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the running launch is stopped too
    work = Path(tempfile.mkdtemp(prefix="tf-bench-strategies-"))
    recipes, digest = freeze_code(work, args.code_ref)
    print(f"work folder: {work}", flush=True)
    report = {"command": "python " + " ".join(["benchmarks/strategies.py", *sys.argv[1:]]),
              **provenance(digest, args.code_ref), "model": args.model, "steps": args.steps,
              "rounds": args.rounds, "results": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for round_ in range(args.rounds):
        for method in args.methods:
            for strategy in args.strategies:
                report["results"].append(run(strategy, method, round_, args, recipes, work))
                args.out.write_text(json.dumps(report, indent=2) + "\n")
                print(render(report["results"][-1:]).splitlines()[-1], flush=True)
    print(render(report["results"]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
