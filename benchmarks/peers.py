"""tunefleet against its peers, side by side in one invocation.

Five systems train the same Llama model folder on the same packed token rows
(tunefleet's packer, ``data.packing=true``), with the same sequence length,
global batch (2 ranks x ``--micro-batch`` rows, no accumulation), optimizer,
cosine schedule without warm-up, clipping and number of steps:

- ``tunefleet-ddp``: ``tunefleet launch`` on an embedded local Ray, 2 workers;
- ``torchrun``: the hand-written floor, ``torchrun --nproc_per_node 2 torchrun_ddp.py``;
- ``trl``: TRL's ``SFTTrainer`` via ``accelerate launch`` (2 CPU ranks, gloo), ``trl_sft.py``;
- ``tunefleet-fsdp`` and ``tunefleet-deepspeed_zero3``: ``tunefleet launch`` again.

One round runs each system once; rounds alternate the order (forward, then
reversed) so drift in the machine's load hits every system alike. Every run is
a subprocess with ``OMP_NUM_THREADS=1`` whose CPU use is sampled from /proc
(``harness.py``). The package, the recipes and the two rank scripts are copied
when the benchmark starts, so edits to the working tree meanwhile change nothing.

Per run: steady-state tokens/s (median over the steps after ``--warmup`` of
global non-pad tokens / wall time between step ends), tokens per rank CPU-second,
time from the command to the end of optimizer step 1, per-rank peak RSS and held
bytes (parameters + gradients + optimizer state after the optimizer step),
MFU against the fp32 matmul peak of one core measured here, and packing
efficiency (non-pad tokens / (rows x max_seq_len)). The JSON is rewritten after
every run; ``report.py`` renders it into docs/benchmarks.md with plots.

    python benchmarks/peers.py --model tiny:llama-50m --steps 12 --warmup 2 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from ddp_vs_torchrun import floor_command, recipe_overrides
from frozen import freeze_code, provenance
from harness import (
    BIN,
    REPO,
    Run,
    RunFailed,
    machine,
    median,
    ratio,
    require_quiet,
    run_logged,
    subprocess_env,
    versions,
)

SYSTEMS = ("tunefleet-ddp", "torchrun", "trl", "tunefleet-fsdp", "tunefleet-deepspeed_zero3")
BASELINES = ("torchrun", "trl")
RANK_SCRIPTS = ("torchrun_ddp.py", "trl_sft.py")
NUM_WORKERS = 2
PEAK_PROBE_SIZES = (512, 1024, 2048)
LOSS_TOLERANCE = 1e-3  # step-1 loss; TRL's chunked LM head sums in another order
FIGURES = ("tokens_per_s", "tokens_per_rank_cpu_s", "first_step_s", "wall_s", "peak_rss_bytes", "held_bytes",
           "mfu", "mfu_logged", "packing_efficiency", "rank_cpu_cores", "loss_step_1", "loss_last")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny:llama-50m", help="model.path for every system.")
    parser.add_argument("--steps", type=int, default=12, help="Optimizer steps per run.")
    parser.add_argument("--rounds", type=int, default=3, help="Runs of every system (at least 3 for a median).")
    parser.add_argument("--micro-batch", type=int, default=4, help="Rows per rank per step (no accumulation).")
    parser.add_argument("--seq-len", type=int, default=128, help="data.max_seq_len: packed row length.")
    parser.add_argument("--warmup", type=int, default=2, help="Steps left out of the steady-state medians.")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS), help="Systems to run.")
    parser.add_argument("--code-ref", help="Run the code of this git commit instead of the working tree.")
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "peers.json"), help="JSON result.")
    parser.add_argument("--allow-busy", action="store_true", help="Run on a busy machine (the result says so).")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup + 2:
        parser.error(f"--steps must exceed --warmup + 2 ({args.warmup + 2}) to leave steady-state steps")
    return args


def overrides(args: argparse.Namespace, output_dir: Path, strategy: str = "ddp") -> list[str]:
    """ddp_vs_torchrun's recipe settings with packing on, no warm-up (TRL's warm-up starts at lr 0) and a strategy."""
    changed = ("data.packing=", "parallelism.strategy=", "train.warmup_steps=")
    return [o for o in recipe_overrides(args, output_dir) if not o.startswith(changed)] + [
        "data.packing=true", f"parallelism.strategy={strategy}", "train.warmup_steps=0"]


# --------------------------------------------------------------------------- inputs
def freeze(args: argparse.Namespace, work: Path) -> tuple[Path, dict, str]:
    """Frozen code (package, recipes, rank scripts); returns the recipe, provenance and the scripts' folder."""
    recipes, digest = freeze_code(work, args.code_ref)
    scripts = work / "code" / "bench"
    scripts.mkdir()
    for name in RANK_SCRIPTS:
        shutil.copy2(REPO / "benchmarks" / name, scripts / name)
    return recipes / "llama-full-ddp.yaml", provenance(digest, args.code_ref), str(scripts)


def prepare(args: argparse.Namespace, recipe_path: Path, work: Path) -> tuple[object, str, str, dict]:
    """Resolve the recipe, build the model folder and the packed token cache once; the model's FLOPs."""
    import torch
    import transformers

    from tunefleet.launcher.config import load_recipe
    from tunefleet.launcher.data import preprocess
    from tunefleet.launcher.errors import RecipeError
    from tunefleet.launcher.model import modeling

    try:
        recipe = load_recipe(recipe_path, overrides(args, work / "resolve-only"))
    except RecipeError as exc:
        sys.exit(f"error: {exc}")
    model_path = modeling.resolve_model_path(recipe.model)
    data_dir = preprocess.prepare(recipe.data, modeling.load_tokenizer(model_path), model_path, seed=recipe.train.seed)
    config = transformers.AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        num_params = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(config).parameters())
    return recipe, model_path, str(data_dir), {"config": config, "num_params": num_params}


def commands(args: argparse.Namespace, recipe, recipe_path: Path, scripts: str, model_path: str,
             data_dir: str) -> dict:
    """system -> function(output path) -> command; every system takes its knobs from one resolved recipe."""
    floor = floor_command(recipe, model_path, data_dir)
    script_at = floor.index(next(a for a in floor if a.endswith("torchrun_ddp.py")))
    floor[script_at] = f"{scripts}/torchrun_ddp.py"
    script_args = floor[script_at + 1:]
    with socket.socket() as probe:  # accelerate's rendezvous port; torchrun --standalone picks its own
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    trl = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(NUM_WORKERS),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port), f"{scripts}/trl_sft.py", *script_args]

    def tunefleet(strategy: str):
        return lambda out: [str(BIN / "tunefleet"), "launch", str(recipe_path),
                            *(f"--set={o}" for o in overrides(args, out, strategy))]

    built = {"torchrun": lambda out: [*floor, "--out", str(out)], "trl": lambda out: [*trl, "--out", str(out)]}
    built.update({f"tunefleet-{s}": tunefleet(s) for s in ("ddp", "fsdp", "deepspeed_zero3")})
    return built


# --------------------------------------------------------------------------- runs
def run_system(system: str, command, round_: int, work: Path) -> Run:
    """One run; its per-step rows (step, time, loss, num_input_tokens; memory on the last row)."""
    name = f"{system}-{round_}"
    out = work / (name if system.startswith("tunefleet") else f"{name}.jsonl")
    started, wall_s, samples = run_logged(command(out), work / f"{name}.log")
    if system.startswith("tunefleet"):
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        rows = [row for row in rows if "loss" in row]
        previous_seen = 0
        for row in rows:  # tokens of this step = growth of the running total
            row["num_input_tokens"], previous_seen = row["tokens_seen"] - previous_seen, row["tokens_seen"]
    else:
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    return Run(system, round_, started, wall_s, rows, samples)


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops_per_rank: float, num_ranks: int) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the ranks' combined measured peak."""
    return tokens_per_s * flops_per_token / (peak_flops_per_rank * num_ranks)


def figures(run: Run, args: argparse.Namespace, model: dict, peak_flops: float) -> dict:
    """Every figure of one run, computed the same way for every system."""
    from tunefleet.launcher.training.throughput import flops_per_token

    summary = run.summary(args.warmup)
    rows_per_step = args.micro_batch * NUM_WORKERS
    tokens = [s["num_input_tokens"] for s in run.steps]
    per_token = flops_per_token(model["config"], model["num_params"], model["num_params"],
                                seq_len=int(median(tokens)) // rows_per_step)
    last = run.steps[-1]
    logged_mfu = [s["mfu"] for s in run.steps[args.warmup:] if s.get("mfu") is not None]
    return {
        "system": run.kind, "round": run.pair, **{k: v for k, v in summary.items() if k not in ("kind", "pair")},
        "tokens_per_step": tokens,
        "peak_rss_bytes_per_rank": last["peak_rss_bytes_per_rank"], "held_bytes_per_rank": last["held_bytes_per_rank"],
        "peak_rss_bytes": max(last["peak_rss_bytes_per_rank"]), "held_bytes": max(last["held_bytes_per_rank"]),
        "mfu": mfu(summary["tokens_per_s"], per_token, peak_flops, NUM_WORKERS),
        "mfu_logged": median(logged_mfu),  # tunefleet's own, over its step timer only
        "packing_efficiency": sum(tokens) / (len(tokens) * rows_per_step * args.seq_len),
        "flops_per_token": per_token,
    }


def summarize(runs: list[dict], systems: list[str]) -> dict:
    """Medians over rounds per system, and ratios of the medians to each baseline that ran."""
    medians = {s: {k: median([r.get(k) for r in runs if r["system"] == s and "error" not in r]) for k in FIGURES}
               for s in systems}
    ratios = {base: {s: {k: ratio(medians[s][k], medians[base][k]) for k in ("tokens_per_s", "first_step_s",
                                                                              "tokens_per_rank_cpu_s")}
                     for s in systems}
              for base in BASELINES if base in systems}
    return {"medians": medians, "ratios": ratios}


def checks(runs: list[dict]) -> dict:
    """Every run must see the same tokens at every step; step-1 losses must agree."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {}
    first = [r["loss_step_1"] for r in ok]
    return {"same_tokens_per_step": all(r["tokens_per_step"] == ok[0]["tokens_per_step"] for r in ok),
            "tokens_per_step_median": median(ok[0]["tokens_per_step"]),
            "loss_step_1": {r["system"]: r["loss_step_1"] for r in ok},
            "max_loss_step_1_diff": max(first) - min(first),
            "loss_step_1_ok": max(first) - min(first) <= LOSS_TOLERANCE}


def round_order(systems: list[str], round_: int) -> list[str]:
    return list(systems) if round_ % 2 == 0 else list(reversed(systems))


def measure_peak() -> float:
    """fp32 matmul FLOP/s of one thread: what one rank with OMP_NUM_THREADS=1 can reach at best.

    Measured in a fresh process with the ranks' environment, best of several
    sizes and repeats: on a shared machine a probe is often descheduled
    mid-matmul, which reads as a lower peak (and an MFU above 1).
    """
    probe = ("from tunefleet.launcher.training.throughput import cpu_peak_flops; "
             f"print(max(cpu_peak_flops(n, repeats=10) for n in {PEAK_PROBE_SIZES}))")
    out = subprocess.run([sys.executable, "-c", probe], env=subprocess_env(), capture_output=True, text=True,
                         check=True)
    return float(out.stdout.split()[-1])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    quiet = require_quiet(args.allow_busy)
    work = Path(tempfile.mkdtemp(prefix="tf-bench-peers-"))
    recipe_path, code, scripts = freeze(args, work)
    recipe, model_path, data_dir, model = prepare(args, recipe_path, work)
    built = commands(args, recipe, recipe_path, scripts, model_path, data_dir)
    peaks = [measure_peak()]
    result = {"command": " ".join(["python", "benchmarks/peers.py", *(argv if argv is not None else sys.argv[1:])]),
              "config": {k: v for k, v in vars(args).items() if k != "out"}, "machine": {**machine(), "start": quiet},
              "code": code,
              "versions": versions("torch", "transformers", "trl", "accelerate", "ray", "deepspeed", "datasets"),
              "model": {"path": args.model, "num_params": model["num_params"]},
              "commands": {s: " ".join(built[s](Path(f"<out-{s}>"))).replace(f"{REPO}/", "") for s in args.systems},
              "runs": []}
    print(f"model {model_path} ({model['num_params'] / 1e6:.1f}M)\ndata  {data_dir}\nwork  {work}", flush=True)
    for round_ in range(args.rounds):
        for system in round_order(args.systems, round_):
            try:
                run = run_system(system, built[system], round_, work)
                row = figures(run, args, model, max(peaks))
                print(f"round {round_} {system:26s} tokens/s {row['tokens_per_s']:7.1f}  first step "
                      f"{row['first_step_s']:5.1f} s  loss@1 {row['loss_step_1']:.4f}  mfu {row['mfu']:.3f}",
                      flush=True)
            except RunFailed as exc:
                row = {"system": system, "round": round_, "error": str(exc)}
                print(f"round {round_} {system}: {exc}", flush=True)
            result["runs"].append(row)
            result.update(peak_flops_per_rank=max(peaks), peak_flops_samples=peaks,
                          **summarize(result["runs"], args.systems), checks=checks(result["runs"]))
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        peaks.append(measure_peak())
    result["machine"]["load_avg_end"] = machine()["load_avg"]
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    if not (result["checks"].get("same_tokens_per_step") and result["checks"].get("loss_step_1_ok")):
        sys.exit(f"the systems did not do the same work: {result['checks']}")


if __name__ == "__main__":
    main()
