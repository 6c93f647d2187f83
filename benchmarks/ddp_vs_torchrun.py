"""tunefleet's DDP loop against a hand-written torchrun loop, side by side.

Alternates run A (``tunefleet launch`` on an embedded local Ray, 2 workers,
ddp; eval, checkpoints, export and W&B off; a metrics row every step) and run B
(``torchrun --nproc_per_node 2 benchmarks/torchrun_ddp.py``), A B A B ..., both
as subprocesses with ``OMP_NUM_THREADS=1``. Both train the same model folder on
the same token rows with the same optimizer, schedule and clipping; the script
checks that every step has the same number of tokens and that the step-1 losses
agree. The package and the recipe are copied once at the start (``freeze_code``)
so that edits to the working tree during the runs do not change the code under test.

Per run, over the steps after the warm-up:
- tokens/s: median of global non-pad input tokens / wall time between the end
  of one step and the end of the next (all per-step work: batching, the step,
  logging); and the same over the in-loop step timer only (forward, backward,
  all-reduce, clip, optimizer), the region tunefleet's own ``tokens_per_s`` covers;
- tokens per CPU-second of the two rank processes, and the CPU cores used by the
  ranks and by every other process of the run (Ray's, the driver's, torchrun's
  agent), sampled from /proc once a second. On a shared machine wall-clock
  figures mostly say how many cores the ranks got; these do not;
- time to first step: end of optimizer step 1 minus the subprocess start.
It reports medians over runs, tunefleet/torchrun ratios of the medians and per
pair, prints a markdown table and writes a JSON result.

    python benchmarks/ddp_vs_torchrun.py --model tiny:llama-20m --steps 40 --pairs 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from harness import BIN, REPO, Run, cell, median, ratio, require_quiet, run_logged

RECIPE = REPO / "recipes" / "tiny" / "llama-full-ddp.yaml"
FLOOR_SCRIPT = REPO / "benchmarks" / "torchrun_ddp.py"
NUM_WORKERS = 2
LOSS_TOLERANCE = 1e-4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny:llama-20m", help="model.path for both sides (tiny:<spec>, a folder).")
    parser.add_argument("--steps", type=int, default=40, help="Optimizer steps per run.")
    parser.add_argument("--pairs", type=int, default=3, help="A/B pairs to run (at least 3 for a median).")
    parser.add_argument("--micro-batch", type=int, default=8, help="Rows per worker per step (no accumulation).")
    parser.add_argument("--seq-len", type=int, default=128, help="data.max_seq_len: rows are cut to this.")
    parser.add_argument("--warmup", type=int, default=5, help="Steps left out of the steady-state medians.")
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "ddp_vs_torchrun.json"),
                        help="JSON result.")
    parser.add_argument("--work-dir", default=None, help="Run folders and logs (default: a new temp folder).")
    parser.add_argument("--allow-busy", action="store_true", help="Run on a busy machine (the result says so).")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup + 2:
        parser.error(f"--steps must exceed --warmup + 2 ({args.warmup + 2}) to leave steady-state steps")
    return args


def recipe_overrides(args: argparse.Namespace, output_dir: Path) -> list[str]:
    """`--set` values for run A; the floor reads the same resolved recipe."""
    return [
        f"output_dir={output_dir}", f"model.path={args.model}", f"data.max_seq_len={args.seq_len}",
        f"train.max_steps={args.steps}", f"train.micro_batch_size={args.micro_batch}", "train.grad_accum_steps=1",
        "train.eval_every_steps=null", "data.eval=null", "data.packing=false", "checkpoint.every_steps=null",
        "checkpoint.export_final=false", "logging.every_steps=1", "logging.wandb.mode=disabled",
        "parallelism.strategy=ddp", "parallelism.num_nodes=1", f"parallelism.workers_per_node={NUM_WORKERS}",
        "fault_tolerance.max_restarts=0",  # a crash must fail the run, not restart inside the timings
    ]


# --------------------------------------------------------------------------- inputs
def freeze_code(work: Path) -> tuple[Path, str]:
    """Copy the package and the tiny recipes into ``work``; this process and every run import the copy.

    The working tree changes under a benchmark that runs for half an hour (other
    engineers edit it); the copy keeps every run on the code of the moment the
    benchmark began. Returns the copied recipe and a digest of the copied code.
    """
    root = work / "code"
    for name in ("launcher", "strategies", "cluster"):
        shutil.copytree(REPO / name, root / "tunefleet" / name, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "tunefleet" / "__init__.py").write_text("")
    shutil.copytree(RECIPE.parent, root / "recipes" / RECIPE.parent.name)
    sys.path.insert(0, str(root))  # before any `import tunefleet` here; PYTHONPATH for the runs
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    digest = hashlib.sha256()
    for path in sorted((root / "tunefleet").rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return root / "recipes" / RECIPE.parent.name / RECIPE.name, digest.hexdigest()[:16]


def prepare_inputs(args: argparse.Namespace, recipe_path: Path, work: Path):
    """Resolve the recipe, build the model folder and the token cache once, as the driver would."""
    from tunefleet.launcher.config import load_recipe
    from tunefleet.launcher.data import preprocess
    from tunefleet.launcher.errors import RecipeError
    from tunefleet.launcher.model import modeling

    try:
        recipe = load_recipe(recipe_path, recipe_overrides(args, work / "resolve-only"))
    except RecipeError as exc:
        sys.exit(f"error: {exc}")
    train = recipe.train
    if train.schedule != "cosine" or train.min_lr_ratio != 0.0:
        sys.exit("the torchrun floor implements warm-up + cosine to 0 only; keep the recipe's schedule")
    model_path = modeling.resolve_model_path(recipe.model)
    tokenizer = modeling.load_tokenizer(model_path)
    data_dir = preprocess.prepare(recipe.data, tokenizer, model_path, seed=train.seed)
    return recipe, model_path, str(data_dir)


def floor_command(recipe, model_path: str, data_dir: str) -> list[str]:
    """Run B without ``--out`` (added per run): every knob taken from run A's resolved recipe."""
    train = recipe.train
    return [
        str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(NUM_WORKERS), str(FLOOR_SCRIPT),
        "--model-dir", model_path, "--data-dir", data_dir, "--steps", str(train.max_steps),
        "--micro-batch", str(train.micro_batch_size), "--lr", repr(train.lr),
        "--betas", *(repr(b) for b in train.adam_betas), "--eps", repr(train.adam_eps),
        "--weight-decay", repr(train.weight_decay), "--warmup-steps", str(train.warmup_steps),
        "--max-grad-norm", repr(train.max_grad_norm or 0.0), "--seed", str(train.seed),
    ]


def tunefleet_command(args: argparse.Namespace, recipe_path: Path, output_dir: Path) -> list[str]:
    overrides = (f"--set={o}" for o in recipe_overrides(args, output_dir))
    return [str(BIN / "tunefleet"), "launch", str(recipe_path), *overrides]


def run_tunefleet(args: argparse.Namespace, recipe_path: Path, pair: int, work: Path) -> Run:
    output_dir = work / f"tunefleet-{pair}"
    log_path = work / f"tunefleet-{pair}.log"
    started, wall_s, cpu_samples = run_logged(tunefleet_command(args, recipe_path, output_dir), log_path)
    if "Connecting to existing Ray cluster" in log_path.read_text():
        sys.exit(f"run A joined a running Ray cluster instead of an embedded one; see {log_path}")
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [row for row in rows if "loss" in row]
    previous_seen = 0
    for row in rows:  # tokens of this step = growth of the running total
        row["num_input_tokens"], previous_seen = row["tokens_seen"] - previous_seen, row["tokens_seen"]
    return Run("tunefleet", pair, started, wall_s, rows, cpu_samples)


def run_floor(floor: list[str], pair: int, work: Path) -> Run:
    out = work / f"torchrun-{pair}.jsonl"
    started, wall_s, cpu_samples = run_logged([*floor, "--out", str(out)], work / f"torchrun-{pair}.log")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return Run("torchrun", pair, started, wall_s, rows, cpu_samples)


# --------------------------------------------------------------------------- results
def check_same_work(runs: list[Run]) -> dict:
    """Every run must see the same tokens at every step; step-1 losses must agree."""
    tokens = [[s["num_input_tokens"] for s in run.steps] for run in runs]
    kinds = ("tunefleet", "torchrun")
    first_losses = {kind: [run.steps[0]["loss"] for run in runs if run.kind == kind] for kind in kinds}
    loss_diff = max(abs(run.steps[0]["loss"] - runs[0].steps[0]["loss"]) for run in runs)
    last_diff = max(abs(run.steps[-1]["loss"] - runs[0].steps[-1]["loss"]) for run in runs)
    return {
        "same_tokens_per_step": all(t == tokens[0] for t in tokens),
        "tokens_per_step": {"min": min(tokens[0]), "median": statistics.median(tokens[0]), "max": max(tokens[0]),
                            "total": sum(tokens[0])},
        "tokens_per_step_by_kind": {kind: statistics.median(next(t for run, t in zip(runs, tokens, strict=True)
                                                                 if run.kind == kind)) for kind in kinds},
        "loss_step_1": first_losses,
        "max_loss_step_1_diff": loss_diff,
        "max_loss_last_step_diff": last_diff,
        "loss_step_1_ok": loss_diff <= LOSS_TOLERANCE,
    }


METRICS = (  # (key, label, format) in the order of the table
    ("tokens_per_s", "tokens/s, wall clock (median of steady-state steps)", "{:,.0f}"),
    ("step_tokens_per_s", "tokens/s, step timer only", "{:,.0f}"),
    ("tokens_per_rank_cpu_s", "tokens per CPU-second of the 2 ranks", "{:,.1f}"),
    ("first_step_s", "time to first optimizer step (s)", "{:.1f}"),
    ("wall_s", "whole run, wall (s)", "{:.1f}"),
    ("rank_cpu_cores", "CPU cores the ranks got (of 2)", "{:.2f}"),
    ("other_cpu_cores", "CPU cores used by the rest of the run's processes", "{:.3f}"),
)


def summarize(runs: list[Run], warmup: int) -> dict:
    per_run = [run.summary(warmup) for run in runs]
    kinds = ("tunefleet", "torchrun")
    medians = {kind: {key: median([r[key] for r in per_run if r["kind"] == kind]) for key, _, _ in METRICS}
               for kind in kinds}
    by_pair = {(r["pair"], r["kind"]): r for r in per_run}
    pairs = sorted({r["pair"] for r in per_run})
    pair_ratios = {key: [ratio(by_pair[p, "tunefleet"][key], by_pair[p, "torchrun"][key]) for p in pairs]
                   for key in ("tokens_per_s", "tokens_per_rank_cpu_s", "first_step_s")}
    return {
        "medians": medians,
        "ratio_tunefleet_over_torchrun": {key: ratio(medians["tunefleet"][key], medians["torchrun"][key])
                                          for key, _, _ in METRICS},
        "pair_ratios": pair_ratios,
        "runs": per_run,
    }


def markdown_table(summary: dict, checks: dict) -> str:
    med, ratios = summary["medians"], summary["ratio_tunefleet_over_torchrun"]
    lines = ["| metric (median over runs) | tunefleet | torchrun | tunefleet / torchrun |", "|---|---:|---:|---:|"]
    for key, label, fmt in METRICS:
        lines.append(f"| {label} | {cell(fmt, med['tunefleet'][key])} | {cell(fmt, med['torchrun'][key])} "
                     f"| {cell('{:.3f}', ratios[key])} |")
    tokens = checks["tokens_per_step"]
    lines.append("")
    for key, values in summary["pair_ratios"].items():
        lines.append(f"per-pair ratio {key}: " + ", ".join(cell("{:.3f}", v) for v in values))
    lines += [f"tokens/step (global, non-pad): identical at every step on both sides = "
              f"{checks['same_tokens_per_step']}; median {checks['tokens_per_step_by_kind']}; "
              f"min/median/max {tokens['min']}/{tokens['median']}/{tokens['max']}",
              f"loss at step 1: {checks['loss_step_1']} (max diff {checks['max_loss_step_1_diff']:.2e}); "
              f"max diff at the last step {checks['max_loss_last_step_diff']:.2e}"]
    return "\n".join(lines)


def environment() -> dict:
    import ray
    import torch
    import transformers

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout

    return {"date": datetime.now(UTC).isoformat(timespec="seconds"), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "ray": ray.__version__, "transformers": transformers.__version__,
            "git_commit": git("rev-parse", "HEAD").strip(),
            # The code under test is the working tree when the benchmark began (see freeze_code).
            "uncommitted_loop_files": git("status", "--porcelain", "launcher", "strategies").splitlines(),
            "load_avg_1m_at_start": os.getloadavg()[0]}


# --------------------------------------------------------------------------- main
def run_pairs(args: argparse.Namespace, recipe_path: Path, work: Path) -> list[Run]:
    recipe, model_path, data_dir = prepare_inputs(args, recipe_path, work)
    floor = floor_command(recipe, model_path, data_dir)
    print(f"model {model_path}\ndata  {data_dir}\nwork  {work}", flush=True)
    runs: list[Run] = []
    for pair in range(args.pairs):  # A B A B ...: drift in machine load hits both sides alike
        runs.append(run_tunefleet(args, recipe_path, pair, work))
        print_run(runs[-1], args.warmup)
        runs.append(run_floor(floor, pair, work))
        print_run(runs[-1], args.warmup)
    return runs


def print_run(run: Run, warmup: int) -> None:
    cpu = run.cpu_use(warmup)
    print(f"pair {run.pair} {run.kind:9s} tokens/s {run.tokens_per_s(warmup):6,.0f}  "
          f"tokens/rank-CPU-s {cell('{:6,.1f}', cpu['tokens_per_rank_cpu_s'])}  "
          f"rank cores {cell('{:.2f}', cpu['rank_cpu_cores'])}  "
          f"first step {run.first_step_s:5.1f} s  wall {run.wall_s:5.1f} s", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    quiet = require_quiet(args.allow_busy)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="tf-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**environment(), "start": quiet}
    recipe_path, env["code_sha256"] = freeze_code(work)
    runs = run_pairs(args, recipe_path, work)
    checks = check_same_work(runs)
    summary = summarize(runs, args.warmup)
    env["load_avg_1m_at_end"] = os.getloadavg()[0]
    result = {"command": " ".join(["python", "benchmarks/ddp_vs_torchrun.py", *(argv or sys.argv[1:])]),
              "config": {k: v for k, v in vars(args).items() if k not in ("out", "work_dir")},
              "environment": env, "checks": checks, **summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("\n" + markdown_table(summary, checks) + f"\n\nwrote {args.out}")
    if not (checks["same_tokens_per_step"] and checks["loss_step_1_ok"]):
        sys.exit("the two sides did not do the same work (see the checks above)")


if __name__ == "__main__":
    main()
