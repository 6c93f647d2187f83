"""How much of tunefleet's time to first step is Ray Train's own: a bare Ray Train launch beside `tunefleet launch`.

    python benchmarks/ray_train_floor.py [--rounds 3] [--out docs/benchmarks/ray_train_floor.json]

The floor is the least any launch through Ray Train's worker group can take here: a fresh Python process that
imports Ray, starts a local Ray exactly as tunefleet's embedded one (no dashboard, the quiet settings, worker
niceness 0), imports Ray Train and runs a TorchTrainer of 2 gloo workers whose function does nothing but note
the time it started. tunefleet is `tunefleet launch` of the DDP recipe on tiny:llama-20m (2 workers, packed
128-token rows, micro batch 4; embedded_ray.py's settings, dashboard off), 3 steps. Both are timed from the moment the
subprocess is spawned: for the floor, to its function's start;
for tunefleet, to its training function's start (`worker_start` of startup.json) and to the end of step 1.
Parts: the floor's, and tunefleet's launch summary (`startup_s`) with what came before its clock started
(Python, imports and the recipe checks). Rounds alternate the order. Refuses to start on a busy machine
(1-minute load above 0.5 per core).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import embedded_ray
from frozen import freeze_code, provenance
from harness import BIN, REPO, alternating, cell, machine, median, require_quiet, run_logged

from tunefleet.launcher.run import session

SIDES = ("ray-train floor", "tunefleet")
STEPS = 3


def run_floor(pair: int, work: Path) -> dict:
    marks = work / f"floor-{pair}.json"
    command = [sys.executable, str(Path(__file__).resolve().parent / "ray_train_floor_child.py"), str(marks)]
    spawned, wall_s, _ = run_logged(command, work / f"floor-{pair}.log")
    t = json.loads(marks.read_text())
    return {"kind": SIDES[0], "pair": pair, "wall_s": wall_s, "to_train_fn_s": t["fn_started"] - spawned,
            "parts_s": {"python_and_import_ray": t["ray_imported"] - spawned,
                        "ray_start": t["ray_up"] - t["ray_imported"],
                        "import_ray_train": t["train_imported"] - t["ray_up"],
                        "worker_group_start": t["fn_started"] - t["train_imported"]}}


def run_tunefleet(recipe: Path, pair: int, work: Path) -> dict:
    output_dir = work / f"tunefleet-{pair}"
    command = [str(BIN / "tunefleet"), "launch", str(recipe), *embedded_ray.overrides(output_dir, STEPS, False)]
    spawned, wall_s, _ = run_logged(command, work / f"tunefleet-{pair}.log")
    phases = json.loads((output_dir / "startup.json").read_text())  # wall clock of the workers' phases
    startup = json.loads((output_dir / "summary.json").read_text())["startup_s"]
    before_ray = phases["worker_start"] - spawned - sum(startup[k] for k in ("ray_start", "job_preparation",
                                                                              "worker_group_start"))
    return {"kind": SIDES[1], "pair": pair, "wall_s": wall_s, "to_train_fn_s": phases["worker_start"] - spawned,
            "to_first_step_end_s": phases["first_step_done"] - spawned,
            "parts_s": {"python_imports_and_checks": before_ray, **startup}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "ray_train_floor.json")
    parser.add_argument("--allow-busy", action="store_true", help="Run on a busy machine (the result says so).")
    args = parser.parse_args(argv)
    quiet = require_quiet(args.allow_busy)
    # The floor's Ray is started as tunefleet starts its embedded one (tunefleet sets the same values itself).
    os.environ.update({**session.QUIET_EMBEDDED_RAY, "RAY_worker_niceness": "0"})
    start = machine()
    with tempfile.TemporaryDirectory(prefix="tf-bench-floor-") as tmp:
        work = Path(tmp)
        recipes, digest = freeze_code(work)
        runs = []
        for pair, side in alternating(args.rounds, SIDES):
            runs.append(run_floor(pair, work) if side == SIDES[0]
                        else run_tunefleet(recipes / "llama-full-ddp.yaml", pair, work))
            print(f"round {pair} {side:16}: train function starts {runs[-1]['to_train_fn_s']:.1f} s after spawn",
                  file=sys.stderr, flush=True)
    by_side = {side: [r for r in runs if r["kind"] == side] for side in SIDES}
    medians = {side: {key: median([r[key] for r in by_side[side]])
                      for key in ("to_train_fn_s", "to_first_step_end_s") if key in by_side[side][0]}
               | {f"part_{p}": median([r["parts_s"][p] for r in by_side[side]]) for p in by_side[side][0]["parts_s"]}
               for side in SIDES}
    record = {"command": "python benchmarks/ray_train_floor.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {**start, "start": quiet, "load_avg_end": machine()["load_avg"]},
              "code": provenance(digest), "medians": medians, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    for side in SIDES:
        print(f"{side}: " + ", ".join(f"{k} {cell('{:.2f}', v)}" for k, v in medians[side].items()))


if __name__ == "__main__":
    main()
