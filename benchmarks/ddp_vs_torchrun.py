"""tunefleet's DDP loop against a hand-written torchrun loop, side by side.

Alternates run A (``tunefleet launch`` on an embedded local Ray, 2 workers,
ddp; eval, checkpoints, export and W&B off; a metrics row every step) and run B
(``torchrun --nproc_per_node 2 benchmarks/torchrun_ddp.py``), A B A B ..., both
as subprocesses with ``OMP_NUM_THREADS=1``. Both train the same model folder on
the same token rows with the same optimizer, schedule and clipping; the script
checks that every step has the same number of tokens and that the step-1 losses
agree.

Per run it measures:
- tokens/s: median over the steps after the warm-up of global non-pad input
  tokens / wall time between the end of one step and the end of the next (all
  per-step work: batching, the step, logging);
- step tokens/s: the same over the in-loop step timer only (forward, backward,
  all-reduce, clip, optimizer), the region tunefleet's ``tokens_per_s`` covers;
- time to first step: end of optimizer step 1 minus the subprocess start.
It reports medians over runs and tunefleet/torchrun ratios, prints a markdown
table and writes a JSON result.

    python benchmarks/ddp_vs_torchrun.py --model tiny:llama-20m --steps 40 --pairs 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RECIPE = REPO / "recipes" / "tiny" / "llama-full-ddp.yaml"
FLOOR_SCRIPT = REPO / "benchmarks" / "torchrun_ddp.py"
NUM_WORKERS = 2
LOSS_TOLERANCE = 1e-4
RUN_TIMEOUT_S = 1200


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny:llama-20m", help="model.path for both sides (tiny:<spec> or a folder).")
    parser.add_argument("--steps", type=int, default=40, help="Optimizer steps per run.")
    parser.add_argument("--pairs", type=int, default=3, help="A/B pairs to run (at least 3 for a median).")
    parser.add_argument("--micro-batch", type=int, default=8, help="Rows per worker per step (no accumulation).")
    parser.add_argument("--seq-len", type=int, default=128, help="data.max_seq_len: rows are cut to this.")
    parser.add_argument("--warmup", type=int, default=5, help="Steps left out of the steady-state medians.")
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "ddp_vs_torchrun.json"), help="JSON result.")
    parser.add_argument("--work-dir", default=None, help="Run folders and logs (default: a new temp folder).")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup + 2:
        parser.error(f"--steps must exceed --warmup + 2 ({args.warmup + 2}) to leave steady-state steps")
    return args


def recipe_overrides(args: argparse.Namespace, output_dir: Path) -> list[str]:
    """`--set` values for run A; the floor reads the same resolved recipe."""
    return [
        f"output_dir={output_dir}", f"model.path={args.model}", f"data.max_seq_len={args.seq_len}",
        f"train.max_steps={args.steps}", f"train.micro_batch_size={args.micro_batch}", "train.grad_accum_steps=1",
        "train.eval_every_steps=null", "data.eval=null", "checkpoint.every_steps=null",
        "checkpoint.export_final=false", "logging.every_steps=1", "logging.wandb.mode=disabled",
        "parallelism.strategy=ddp", "parallelism.num_nodes=1", f"parallelism.workers_per_node={NUM_WORKERS}",
        "fault_tolerance.max_restarts=0",  # a crash must fail the run, not restart inside the timings
    ]


# --------------------------------------------------------------------------- inputs
def prepare_inputs(args: argparse.Namespace, work: Path):
    """Resolve the recipe, build the model folder and the token cache once, as the driver would."""
    from tunefleet.launcher import data, modeling
    from tunefleet.launcher.recipe import load_recipe

    recipe = load_recipe(RECIPE, recipe_overrides(args, work / "resolve-only"))
    train = recipe.train
    if train.schedule != "cosine" or train.min_lr_ratio != 0.0:
        sys.exit("the torchrun floor implements warm-up + cosine to 0 only; keep the recipe's schedule")
    model_path = modeling.resolve_model_path(recipe.model)
    tokenizer = modeling.load_tokenizer(model_path)
    data_dir = data.prepare(recipe.data, tokenizer, model_path, seed=train.seed)
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


def tunefleet_command(args: argparse.Namespace, output_dir: Path) -> list[str]:
    return [str(BIN / "tunefleet"), "launch", str(RECIPE), *(f"--set={o}" for o in recipe_overrides(args, output_dir))]


# --------------------------------------------------------------------------- runs
@dataclass
class Run:
    kind: str  # "tunefleet" or "torchrun"
    pair: int
    started: float  # unix seconds just before the subprocess was spawned
    wall_s: float  # the whole subprocess
    steps: list[dict] = field(default_factory=list)  # step, loss, num_input_tokens, step_time_s, time

    def tokens_per_s(self, warmup: int) -> float:
        """Median over steady-state steps of tokens / (end of this step - end of the previous)."""
        pairs = zip(self.steps[warmup:], self.steps[warmup + 1:])
        return statistics.median(b["num_input_tokens"] / (b["time"] - a["time"]) for a, b in pairs)

    def step_tokens_per_s(self, warmup: int) -> float:
        return statistics.median(s["num_input_tokens"] / s["step_time_s"] for s in self.steps[warmup + 1:])

    @property
    def first_step_s(self) -> float:
        return self.steps[0]["time"] - self.started

    def summary(self, warmup: int) -> dict:
        return {"kind": self.kind, "pair": self.pair, "tokens_per_s": self.tokens_per_s(warmup),
                "step_tokens_per_s": self.step_tokens_per_s(warmup), "first_step_s": self.first_step_s,
                "wall_s": self.wall_s, "loss_step_1": self.steps[0]["loss"], "loss_last": self.steps[-1]["loss"]}


def subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # embedded Ray, never a shared one
    env.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"})
    return env


def run_logged(command: list[str], log_path: Path) -> tuple[float, float]:
    """Run to completion with output in ``log_path``; (unix start, wall seconds). Kills only its own group."""
    started = time.time()
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=subprocess_env(),
                                cwd=REPO, start_new_session=True)
        try:
            code = proc.wait(timeout=RUN_TIMEOUT_S)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    if code != 0:
        sys.exit(f"{Path(command[0]).name} exited {code}; see {log_path}")
    return started, time.time() - started


def run_tunefleet(args: argparse.Namespace, pair: int, work: Path) -> Run:
    output_dir = work / f"tunefleet-{pair}"
    log_path = work / f"tunefleet-{pair}.log"
    started, wall_s = run_logged(tunefleet_command(args, output_dir), log_path)
    if "Connecting to existing Ray cluster" in log_path.read_text():
        sys.exit(f"run A joined a running Ray cluster instead of an embedded one; see {log_path}")
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [row for row in rows if "loss" in row]
    previous_seen = 0
    for row in rows:  # tokens of this step = growth of the running total
        row["num_input_tokens"], previous_seen = row["tokens_seen"] - previous_seen, row["tokens_seen"]
    return Run("tunefleet", pair, started, wall_s, rows)


def run_floor(floor: list[str], pair: int, work: Path) -> Run:
    out = work / f"torchrun-{pair}.jsonl"
    started, wall_s = run_logged([*floor, "--out", str(out)], work / f"torchrun-{pair}.log")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return Run("torchrun", pair, started, wall_s, rows)


# --------------------------------------------------------------------------- results
def check_same_work(runs: list[Run]) -> dict:
    """Every run must see the same tokens at every step; step-1 losses must agree."""
    tokens = [[s["num_input_tokens"] for s in run.steps] for run in runs]
    first_losses = {kind: [run.steps[0]["loss"] for run in runs if run.kind == kind] for kind in ("tunefleet", "torchrun")}
    loss_diff = max(abs(run.steps[0]["loss"] - runs[0].steps[0]["loss"]) for run in runs)
    last_diff = max(abs(run.steps[-1]["loss"] - runs[0].steps[-1]["loss"]) for run in runs)
    return {
        "same_tokens_per_step": all(t == tokens[0] for t in tokens),
        "tokens_per_step": {"min": min(tokens[0]), "median": statistics.median(tokens[0]), "max": max(tokens[0]),
                            "total": sum(tokens[0])},
        "tokens_per_step_by_kind": {kind: statistics.median(t) for kind, t in zip(("tunefleet", "torchrun"), tokens)},
        "loss_step_1": first_losses,
        "max_loss_step_1_diff": loss_diff,
        "max_loss_last_step_diff": last_diff,
        "loss_step_1_ok": loss_diff <= LOSS_TOLERANCE,
    }


def summarize(runs: list[Run], warmup: int) -> dict:
    per_run = [run.summary(warmup) for run in runs]
    metrics = ("tokens_per_s", "step_tokens_per_s", "first_step_s", "wall_s")
    medians = {kind: {m: statistics.median(r[m] for r in per_run if r["kind"] == kind) for m in metrics}
               for kind in ("tunefleet", "torchrun")}
    by_pair = {(r["pair"], r["kind"]): r for r in per_run}
    pairs = sorted({r["pair"] for r in per_run})
    return {
        "medians": medians,
        "ratio_tunefleet_over_torchrun": {m: medians["tunefleet"][m] / medians["torchrun"][m] for m in metrics},
        "pair_ratios_tokens_per_s": [by_pair[p, "tunefleet"]["tokens_per_s"] / by_pair[p, "torchrun"]["tokens_per_s"]
                                     for p in pairs],
        "runs": per_run,
    }


def markdown_table(summary: dict, checks: dict, warmup: int) -> str:
    med, ratio = summary["medians"], summary["ratio_tunefleet_over_torchrun"]
    rows = [
        (f"tokens/s, wall clock (median, steps > {warmup})", "tokens_per_s", "{:,.0f}"),
        ("tokens/s, step timer only", "step_tokens_per_s", "{:,.0f}"),
        ("time to first optimizer step (s)", "first_step_s", "{:.1f}"),
        ("whole run, wall (s)", "wall_s", "{:.1f}"),
    ]
    lines = ["| metric | tunefleet | torchrun | tunefleet / torchrun |", "|---|---:|---:|---:|"]
    for label, key, fmt in rows:
        lines.append(f"| {label} | {fmt.format(med['tunefleet'][key])} | {fmt.format(med['torchrun'][key])} "
                     f"| {ratio[key]:.3f} |")
    pair_ratios = ", ".join(f"{r:.3f}" for r in summary["pair_ratios_tokens_per_s"])
    tokens = checks["tokens_per_step"]
    lines += ["", f"per-pair tokens/s ratios: {pair_ratios}",
              f"tokens/step (global, non-pad): same on both sides = {checks['same_tokens_per_step']}; "
              f"by side {checks['tokens_per_step_by_kind']}; min/median/max {tokens['min']}/{tokens['median']}/{tokens['max']}",
              f"loss at step 1: {checks['loss_step_1']} (max diff {checks['max_loss_step_1_diff']:.2e}); "
              f"max diff at the last step {checks['max_loss_last_step_diff']:.2e}"]
    return "\n".join(lines)


def environment() -> dict:
    import ray
    import torch
    import transformers

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "ray": ray.__version__, "transformers": transformers.__version__, "git_commit": commit.stdout.strip(),
            "load_avg_1m_at_start": os.getloadavg()[0]}


# --------------------------------------------------------------------------- main
def run_pairs(args: argparse.Namespace, work: Path) -> list[Run]:
    recipe, model_path, data_dir = prepare_inputs(args, work)
    floor = floor_command(recipe, model_path, data_dir)
    print(f"model {model_path}\ndata  {data_dir}\nwork  {work}", flush=True)
    runs: list[Run] = []
    for pair in range(args.pairs):  # A B A B ...: drift in machine load hits both sides alike
        runs.append(run_tunefleet(args, pair, work))
        print_run(runs[-1], args.warmup)
        runs.append(run_floor(floor, pair, work))
        print_run(runs[-1], args.warmup)
    return runs


def print_run(run: Run, warmup: int) -> None:
    print(f"pair {run.pair} {run.kind:9s} tokens/s {run.tokens_per_s(warmup):8,.0f}  "
          f"first step {run.first_step_s:5.1f} s  wall {run.wall_s:5.1f} s", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="tf-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    env = environment()
    runs = run_pairs(args, work)
    checks = check_same_work(runs)
    summary = summarize(runs, args.warmup)
    env["load_avg_1m_at_end"] = os.getloadavg()[0]
    result = {"command": " ".join(["python", "benchmarks/ddp_vs_torchrun.py", *(argv or sys.argv[1:])]),
              "config": {k: v for k, v in vars(args).items() if k not in ("out", "work_dir")},
              "environment": env, "checks": checks, **summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("\n" + markdown_table(summary, checks, args.warmup) + f"\n\nwrote {args.out}")
    if not (checks["same_tokens_per_step"] and checks["loss_step_1_ok"]):
        sys.exit("the two sides did not do the same work (see the checks above)")


if __name__ == "__main__":
    main()
