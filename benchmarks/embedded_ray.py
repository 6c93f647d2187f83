"""The embedded local Ray with and without its dashboard (`cluster.dashboard`): time to first step and its
parts, steady-state tokens/s and the CPU the ranks get, in alternating pairs on one machine.

    python benchmarks/embedded_ray.py [--pairs 3] [--steps 40] [--out docs/benchmarks/embedded_ray.json]

Each run is `tunefleet launch` of the DDP recipe on tiny:llama-20m (2 workers, packed 128-token rows, micro
batch 4, fp32) on a fresh embedded Ray; the order alternates (on, off, off, on, ...) so that drift in the
machine's speed falls on both sides. Refuses to start on a busy machine (1-minute load above 0.5 per core).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import peers
from frozen import freeze_code, provenance
from harness import BIN, REPO, Run, alternating, cell, machine, median, ratio, require_quiet, run_logged

SIDES = ("dashboard", "no dashboard")


def overrides(output_dir: Path, steps: int, dashboard: bool) -> list[str]:
    """The peers benchmark's tunefleet-ddp settings (packed rows, no warm-up) with the dashboard on or off."""
    settings = argparse.Namespace(model="tiny:llama-20m", seq_len=128, steps=steps, micro_batch=4)
    chosen = [*peers.overrides(settings, output_dir), f"cluster.dashboard={str(dashboard).lower()}"]
    return [f"--set={o}" for o in chosen]


def run(recipe: Path, side: str, pair: int, steps: int, work: Path) -> dict:
    output_dir = work / f"{side.replace(' ', '-')}-{pair}"
    command = [str(BIN / "tunefleet"), "launch", str(recipe), *overrides(output_dir, steps, side == "dashboard")]
    started, wall_s, samples = run_logged(command, work / f"{output_dir.name}.log")
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [row for row in rows if "loss" in row]
    seen = 0
    for row in rows:  # tokens of this step = growth of the running total
        row["num_input_tokens"], seen = row["tokens_seen"] - seen, row["tokens_seen"]
    measured = Run(side, pair, started, wall_s, rows, samples).summary(warmup=5)
    return {**measured, "startup_s": json.loads((output_dir / "summary.json").read_text())["startup_s"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "embedded_ray.json")
    parser.add_argument("--allow-busy", action="store_true", help="Run on a busy machine (the result says so).")
    args = parser.parse_args(argv)
    quiet = require_quiet(args.allow_busy)
    start = machine()
    with tempfile.TemporaryDirectory(prefix="tf-bench-ray-") as tmp:
        work = Path(tmp)
        recipes, digest = freeze_code(work)
        runs = []
        for pair, side in alternating(args.pairs, SIDES):
            runs.append(run(recipes / "llama-full-ddp.yaml", side, pair, args.steps, work))
            print(f"pair {pair} {side:12}: first step {runs[-1]['first_step_s']:.1f} s, "
                  f"{runs[-1]['tokens_per_s']:.0f} tokens/s", file=sys.stderr, flush=True)
    keys = ("first_step_s", "tokens_per_s", "rank_cpu_cores", "other_cpu_cores")
    phases = list(runs[0]["startup_s"])
    medians = {side: {**{k: median([r[k] for r in runs if r["kind"] == side]) for k in keys},
                      **{f"startup_{p}_s": median([r["startup_s"][p] for r in runs if r["kind"] == side])
                         for p in phases}} for side in SIDES}
    record = {"command": "python benchmarks/embedded_ray.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {**start, "start": quiet, "load_avg_end": machine()["load_avg"]},
              "code": provenance(digest), "medians": medians,
              "ratios_no_dashboard_over_dashboard": {k: ratio(medians["no dashboard"][k], medians["dashboard"][k])
                                                      for k in medians["dashboard"]},
              "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print("| figure (median) | dashboard | no dashboard |\n|---|---:|---:|")
    for key in medians["dashboard"]:
        on, off = (cell("{:.3f}", medians[side][key]) for side in SIDES)
        print(f"| {key} | {on} | {off} |")


if __name__ == "__main__":
    main()
