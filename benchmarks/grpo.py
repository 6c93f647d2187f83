"""Where a GRPO step's time goes, measured through `tunefleet launch` on the embedded Ray: sampling the
rollouts (generation, rewards, the reference's log-probabilities) against the optimizer updates, per step,
on the shipped capitals pipeline (60 SFT steps, then GRPO); and the held-out exact match it reaches.

    python benchmarks/grpo.py [--seeds 0 1 2] [--out docs/benchmarks/grpo.json] [--allow-busy]

Prints a markdown table; the JSON keeps every seed's per-step figures. The code under test is copied when the
benchmark starts (see frozen.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from frozen import freeze_code, load_avg, provenance
from harness import require_quiet

REPO = Path(__file__).resolve().parents[1]
TUNEFLEET = str(Path(sys.executable).parent / "tunefleet")
QUIET = ["--set=logging.wandb.mode=disabled", "--set=checkpoint.every_steps=null"]
SFT_STEPS = 60


def launch(recipe: Path, out: Path, *overrides: str) -> list[dict]:
    result = subprocess.run([TUNEFLEET, "launch", str(recipe), f"--set=output_dir={out}", *QUIET, *overrides],
                            capture_output=True, text=True, env={**os.environ})
    if result.returncode:
        sys.exit(f"{recipe} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def measure(recipes: Path, seed: int, sft_model: Path, work: Path) -> dict:
    rows = launch(recipes / "llama-capitals-grpo.yaml", work / f"grpo-{seed}", f"--set=model.path={sft_model}",
                  f"--set=train.seed={seed}")
    steps = [r for r in rows if "rollout_s" in r][1:]  # the first step also warms up
    evals = [r for r in rows if "eval_exact_match" in r]
    rollout, optimize = (statistics.median(r[key] for r in steps) for key in ("rollout_s", "optimize_s"))
    return {"seed": seed, "rollout_s_median": rollout, "optimize_s_median": optimize,
            "rollout_share": rollout / (rollout + optimize),
            "exact_match": {str(r["step"]): r["eval_exact_match"] for r in evals},
            "reward_mean_first10": statistics.mean(r["reward_mean"] for r in steps[:10]),
            "reward_mean_last10": statistics.mean(r["reward_mean"] for r in steps[-10:]),
            "kl_last10": statistics.mean(r["kl"] for r in steps[-10:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "grpo.json")
    parser.add_argument("--allow-busy", action="store_true", help="Run on a busy machine (the result says so).")
    args = parser.parse_args()
    quiet = require_quiet(args.allow_busy)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        recipes, digest = freeze_code(work)
        launch(recipes / "llama-capitals-ddp.yaml", work / "sft", f"--set=train.max_steps={SFT_STEPS}",
               "--set=train.eval_every_steps=null")
        results = [measure(recipes, seed, work / "sft" / "final", work) for seed in args.seeds]
    print("| seed | exact match before → after | reward first 10 → last 10 steps | KL (last 10) | rollout s | "
          "optimize s | rollout share |\n|---|---|---|---|---|---|---|")
    for r in results:
        em = list(r["exact_match"].values())
        print(f"| {r['seed']} | {em[0]:.3f} → {em[-1]:.3f} | {r['reward_mean_first10']:.3f} → "
              f"{r['reward_mean_last10']:.3f} | {r['kl_last10']:.3f} | {r['rollout_s_median']:.3f} | "
              f"{r['optimize_s_median']:.3f} | {r['rollout_share']:.0%} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {**provenance(digest), "command": "python benchmarks/grpo.py", "sft_steps": SFT_STEPS,
              "machine": {"date": datetime.now(UTC).isoformat(timespec="seconds"), "start": quiet,
                          "load_avg_end": load_avg()}, "runs": results}
    args.out.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
