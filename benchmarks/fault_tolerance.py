"""Fault-tolerance costs, measured through `tunefleet launch` on the embedded Ray.

1. Recovery time: SIGKILL one worker mid-run; time from the kill to the start
   of the first optimizer step after the restart.
2. Lost work: steps recomputed after that kill, for two `checkpoint.every_steps`.
3. Checkpoint stall: how long the step loop waits per checkpoint, synchronous
   vs `checkpoint.async: true`, alternating runs on a ~100M-parameter model.

    python benchmarks/fault_tolerance.py [--pairs 2] [--out docs/benchmarks/fault_tolerance.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TUNEFLEET = str(Path(sys.executable).parent / "tunefleet")
RECIPE = str(REPO / "recipes" / "tiny" / "llama-full-ddp.yaml")
QUIET = ["--set=logging.wandb.mode=disabled", "--set=train.eval_every_steps=null", "--set=data.eval=null",
         "--set=logging.every_steps=1"]


def launch(out: Path, *overrides: str, fault: str | None = None) -> list[dict]:
    env = {**os.environ, **({"TUNEFLEET_FAULT": fault} if fault else {})}
    cmd = [TUNEFLEET, "launch", RECIPE, f"--set=output_dir={out}", *QUIET, *overrides]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"launch failed:\n{result.stderr[-3000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def recovery(every_steps: int, kill_step: int, work: Path) -> dict:
    out = work / f"recovery-{every_steps}"
    rows = launch(out, "--set=train.max_steps=24", f"--set=checkpoint.every_steps={every_steps}",
                  "--set=fault_tolerance.max_restarts=1", fault=f"rank=1,step={kill_step},kind=sigkill")
    killed_at = (out / f".fault-rank1-step{kill_step}-step").stat().st_mtime
    after = min((r for r in rows if "loss" in r and r["time"] > killed_at), key=lambda r: r["time"])
    last_checkpoint = (kill_step // every_steps) * every_steps
    return {
        "every_steps": every_steps, "killed_before_step": kill_step + 1,
        "recovery_s": round(after["time"] - after["step_time_s"] - killed_at, 1),
        "steps_recomputed": kill_step - last_checkpoint,
    }


def stalls(async_save: bool, work: Path, run: int) -> float:
    out = work / f"stall-{'async' if async_save else 'sync'}-{run}"
    rows = launch(out, "--set=model.path=tiny:llama-100m", "--set=train.max_steps=7",
                  "--set=train.micro_batch_size=1", "--set=data.max_seq_len=64",
                  "--set=checkpoint.every_steps=2", "--set=checkpoint.export_final=false",
                  f"--set=checkpoint.async={str(async_save).lower()}")
    # Mid-run checkpoints only: the final one waits for completion by design.
    return statistics.median(r["checkpoint_stall_s"] for r in rows if "checkpoint_stall_s" in r and r["step"] < 7)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "fault_tolerance.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tf-bench-ft-"))
    results = {"recovery": [recovery(4, 14, work), recovery(8, 14, work)]}
    sync, asynchronous = [], []
    for run in range(args.pairs):
        sync.append(stalls(False, work, run))
        asynchronous.append(stalls(True, work, run))
    results["stall"] = {"sync_s": sync, "async_s": asynchronous,
                        "ratio_async_to_sync": round(statistics.median(asynchronous) / statistics.median(sync), 3)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(render(results))


def render(results: dict) -> str:
    lines = ["| checkpoint.every_steps | kill before step | recovery (s) | steps recomputed |", "|---|---|---|---|"]
    for r in results["recovery"]:
        lines.append(f"| {r['every_steps']} | {r['killed_before_step']} | {r['recovery_s']} "
                     f"| {r['steps_recomputed']} |")
    stall = results["stall"]
    lines += ["", "| checkpoint mode | median stall per checkpoint (s), per run |", "|---|---|",
              f"| sync | {', '.join(f'{s:.2f}' for s in stall['sync_s'])} |",
              f"| async | {', '.join(f'{s:.2f}' for s in stall['async_s'])} |",
              "", f"async / sync stall: {stall['ratio_async_to_sync']:.2f}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
