"""Fault-tolerance costs, measured through `tunefleet launch` on the embedded Ray.

1. Recovery time: SIGKILL one worker mid-run; time from the kill to the start
   of the first optimizer step after the restart (target: at most 60 s).
2. Lost work: steps recomputed after that kill, for two `checkpoint.every_steps`.
3. Checkpoint stall: how long the step loop waits per checkpoint, synchronous
   vs `checkpoint.async: true`, alternating runs on a ~100M-parameter model
   (target: async stall at most 25% of sync).

    python benchmarks/fault_tolerance.py [--pairs 2] [--out docs/benchmarks/fault_tolerance.json]

The code under test is copied when the benchmark starts (see frozen.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from frozen import freeze_code, load_avg, provenance

REPO = Path(__file__).resolve().parents[1]
TUNEFLEET = str(Path(sys.executable).parent / "tunefleet")
QUIET = ["--set=logging.wandb.mode=disabled", "--set=train.eval_every_steps=null", "--set=data.eval=null",
         "--set=logging.every_steps=1"]
STALL_MODEL = "tiny:llama-100m"
STALL_STEPS = 7
STALL_EVERY = 2


def launch(recipe: Path, out: Path, *overrides: str, fault: str | None = None) -> tuple[list[dict], dict]:
    env = {**os.environ, **({"TUNEFLEET_FAULT": fault} if fault else {})}
    cmd = [TUNEFLEET, "launch", str(recipe), f"--set=output_dir={out}", *QUIET, *overrides]
    started, load_before = time.time(), load_avg()
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    (out.parent / f"{out.name}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"launch failed ({out}):\n{result.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # ~2.4 GB per 100M run; the metrics stay
    return rows, {"wall_s": round(time.time() - started, 1), "load_avg_before": load_before,
                  "load_avg_after": load_avg()}


def recovery(recipe: Path, every_steps: int, kill_step: int, work: Path) -> dict:
    out = work / f"recovery-{every_steps}"
    rows, run = launch(recipe, out, "--set=train.max_steps=24", f"--set=checkpoint.every_steps={every_steps}",
                       "--set=fault_tolerance.max_restarts=1", fault=f"rank=1,step={kill_step},kind=sigkill")
    killed_at = (out / f".fault-rank1-step{kill_step}-step").stat().st_mtime
    after = min((r for r in rows if "loss" in r and r["time"] > killed_at), key=lambda r: r["time"])
    last_checkpoint = (kill_step // every_steps) * every_steps
    return {
        "every_steps": every_steps, "killed_before_step": kill_step + 1,
        "first_step_after_restart": after["step"],
        "recovery_s": round(after["time"] - after["step_time_s"] - killed_at, 1),
        # Steps 1..kill_step were done before the kill; the restart resumed after step `after - 1`.
        "resumed_from_step": after["step"] - 1, "expected_resume_step": last_checkpoint,
        "steps_recomputed": kill_step - (after["step"] - 1),
        "restarts": after.get("restarts"), **run,
    }


def stalls(recipe: Path, async_save: bool, work: Path, run: int) -> dict:
    out = work / f"stall-{'async' if async_save else 'sync'}-{run}"
    rows, info = launch(recipe, out, f"--set=model.path={STALL_MODEL}", f"--set=train.max_steps={STALL_STEPS}",
                        "--set=train.micro_batch_size=1", "--set=data.max_seq_len=64", "--set=train.warmup_steps=0",
                        f"--set=checkpoint.every_steps={STALL_EVERY}", "--set=checkpoint.export_final=false",
                        f"--set=checkpoint.async={str(async_save).lower()}")
    # Mid-run checkpoints only: no step follows the final one, so nothing can overlap its write.
    mid = [round(r["checkpoint_stall_s"], 3) for r in rows if "checkpoint_stall_s" in r and r["step"] < STALL_STEPS]
    final = [round(r["checkpoint_stall_s"], 3) for r in rows if "checkpoint_stall_s" in r
             and r["step"] == STALL_STEPS]
    steps = [r for r in rows if "loss" in r]
    return {"async": async_save, "stall_s": mid, "median_stall_s": statistics.median(mid), "final_stall_s": final,
            "step_time_s": [round(r["step_time_s"], 2) for r in steps],
            "held_bytes_per_rank": steps[-1].get("held_bytes_per_rank"), **info}


def checkpoint_cost(run: dict, every_steps: int = STALL_EVERY) -> dict:
    """Stall plus the slowdown of the step right after each checkpoint (a background write shares the
    cores with it): the loop's full cost per checkpoint. Step 1 (warm-up) is left out of both medians."""
    times = dict(enumerate(run["step_time_s"], start=1))
    after = [t for step, t in times.items() if step > every_steps and (step - 1) % every_steps == 0]
    plain = [t for step, t in times.items() if step > 1 and (step - 1) % every_steps != 0]
    slowdown = statistics.median(after) - statistics.median(plain)
    return {"median_step_s": statistics.median(plain), "median_step_after_checkpoint_s": statistics.median(after),
            "cost_per_checkpoint_s": round(run["median_stall_s"] + slowdown, 3),
            # Steps 2.. plus every mid-run stall: the loop's wall time, warm-up step left out.
            "loop_s": round(sum(run["step_time_s"][1:]) + sum(run["stall_s"]), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=2, help="Alternated (sync, async) stall runs.")
    parser.add_argument("--skip-recovery", action="store_true", help="Only measure the checkpoint stall.")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "fault_tolerance.json")
    parser.add_argument("--render", type=Path, help="Only print the tables of an earlier result JSON.")
    parser.add_argument("--code-ref", help="Run the code of this git commit instead of the working tree.")
    args = parser.parse_args()
    if args.render:
        print(render(json.loads(args.render.read_text())))
        return
    work = Path(tempfile.mkdtemp(prefix="tf-bench-ft-"))
    recipes, digest = freeze_code(work, args.code_ref)
    recipe = recipes / "llama-full-ddp.yaml"
    print(f"work folder: {work}", flush=True)
    results = {"command": "python " + " ".join(["benchmarks/fault_tolerance.py", *sys.argv[1:]]),
               **provenance(digest, args.code_ref), "recovery": []}
    if not args.skip_recovery:
        for every_steps in (4, 8):
            results["recovery"].append(recovery(recipe, every_steps, 14, work))
            print(json.dumps(results["recovery"][-1]), flush=True)
    runs = []
    for run in range(args.pairs):
        for async_save in (False, True):
            runs.append(stalls(recipe, async_save, work, run))
            print(json.dumps(runs[-1]), flush=True)
    results["stall"] = summarize_stalls(runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(render(results))
    print(f"wrote {args.out}")


def summarize_stalls(runs: list[dict]) -> dict:
    for run in runs:
        run.update(checkpoint_cost(run))
    summary = {"model": STALL_MODEL, "runs": runs}
    for key, name in (("median_stall_s", "stall"), ("cost_per_checkpoint_s", "cost"), ("loop_s", "loop")):
        sync = [r[key] for r in runs if not r["async"]]
        asynchronous = [r[key] for r in runs if r["async"]]
        summary[f"sync_{name}_s"], summary[f"async_{name}_s"] = sync, asynchronous
        summary[f"ratio_async_to_sync_{name}"] = round(statistics.median(asynchronous) / statistics.median(sync), 3)
    return summary


def render(results: dict) -> str:
    lines = ["| checkpoint.every_steps | kill before step | recovery (s) | steps recomputed | load avg (1 min) |",
             "|---|---|---|---|---|"]
    for r in results["recovery"]:
        lines.append(f"| {r['every_steps']} | {r['killed_before_step']} | {r['recovery_s']} "
                     f"| {r['steps_recomputed']} | {r['load_avg_before'][0]}-{r['load_avg_after'][0]} |")
    stall = results["stall"]
    lines += ["", "| run | mode | stall per mid-run checkpoint (s) | median step (s) "
              "| median step after a checkpoint (s) | stall + slowdown per checkpoint (s) | steps 2-7 + stalls (s) "
              "| load avg (1 min) |", "|---|---|---|---:|---:|---:|---:|---|"]
    for i, r in enumerate(stall["runs"]):
        lines.append(f"| {i + 1} | {'async' if r['async'] else 'sync'} | {', '.join(f'{s:.2f}' for s in r['stall_s'])} "
                     f"| {r['median_step_s']:.2f} | {r['median_step_after_checkpoint_s']:.2f} "
                     f"| {r['cost_per_checkpoint_s']:.2f} | {r['loop_s']:.1f} "
                     f"| {r['load_avg_before'][0]}-{r['load_avg_after'][0]} |")
    lines += ["", f"async / sync, median stall: {stall['ratio_async_to_sync_stall']:.2f}; "
              f"stall + slowdown: {stall['ratio_async_to_sync_cost']:.2f}; steps 2-7 + stalls: "
              f"{stall['ratio_async_to_sync_loop']:.2f} (medians over runs)"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
