"""Run tunefleet's benchmarks, one after another (`make bench`).

    python benchmarks/run.py                    # all, with the arguments behind docs/benchmarks.md
    python benchmarks/run.py --list             # names, what each measures, its command
    python benchmarks/run.py strategies fault_tolerance

Each benchmark is its own script in this folder (run it directly for its other
options, `--help`); it writes its JSON under docs/benchmarks/ and prints a
markdown table. Run one at a time: they time training on the whole machine.
Afterwards ``report.py`` renders docs/benchmarks.md and its plots from the JSON.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# name -> (arguments behind the figures in docs/benchmarks.md, what it measures)
BENCHMARKS: dict[str, tuple[list[str], str]] = {
    "peers": (["--model", "tiny:llama-50m", "--steps", "12", "--warmup", "2", "--rounds", "3"],
              "tunefleet ddp/fsdp/ZeRO-3 vs a torchrun loop and TRL SFTTrainer + Accelerate, same packed rows"),
    "ddp_vs_torchrun": (["--model", "tiny:llama-20m", "--steps", "40", "--pairs", "4"],
                        "tunefleet DDP vs a hand-written torchrun loop: tokens/s, tokens per CPU-s, time to 1st step"),
    "strategies": (["--steps", "5", "--rounds", "2"],
                   "tokens/s and held bytes per rank of ddp, fsdp, ZeRO-2, ZeRO-3 at 2 ranks, full and LoRA"),
    "fault_tolerance": (["--pairs", "2"],
                        "recovery time after a SIGKILL, steps recomputed, checkpoint stall sync vs async"),
    "data_pipeline": (["--launch", "--pairs", "2", "--steps", "40"],
                      "tokenization rows/s, packing efficiency, training tokens/s with vs without packing"),
    "embedded_ray": (["--pairs", "3", "--steps", "40"],
                     "the embedded Ray with vs without its dashboard: time to first step, tokens/s, ranks' CPU"),
    "grpo": (["--seeds", "0", "1", "2"],
             "GRPO on the capitals pipeline: rollout vs optimisation time per step, held-out exact match gain"),
}


def command(name: str) -> list[str]:
    return [sys.executable, str(HERE / f"{name}.py"), *BENCHMARKS[name][0]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"benchmarks to run (default: all): {', '.join(BENCHMARKS)}")
    parser.add_argument("--list", action="store_true", help="List the benchmarks and their commands; run nothing.")
    args = parser.parse_args(argv)
    if unknown := [name for name in args.names if name not in BENCHMARKS]:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    if args.list:
        for name, (extra, what) in BENCHMARKS.items():
            print(f"{name:16} {what}\n{'':16} python benchmarks/{name}.py {' '.join(extra)}")
        return 0
    # The Makefile's caches, also when run directly: DeepSpeed's JIT-built ops and the tiny models.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    os.environ.setdefault("TUNEFLEET_CACHE", str(REPO / ".cache" / "tunefleet"))
    failed = []
    for name in args.names or list(BENCHMARKS):
        print(f"== {name}: {' '.join(command(name)[1:])}", flush=True)
        started = time.monotonic()
        code = subprocess.run(command(name), cwd=REPO).returncode
        print(f"== {name}: {'ok' if code == 0 else f'FAILED (exit {code})'} in {time.monotonic() - started:.0f} s; "
              f"results in docs/benchmarks/{name}.json", flush=True)
        if code != 0:
            failed.append(name)
    # docs/benchmarks.md and its plots, from every JSON result there (also the ones not re-run now).
    code = subprocess.run([sys.executable, str(HERE / "report.py")], cwd=REPO).returncode
    if code != 0:
        failed.append("report")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
