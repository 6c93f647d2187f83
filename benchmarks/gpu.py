"""One command for a GPU machine: `make gpu-check` (or `python benchmarks/gpu.py`).

Needs at least one CUDA GPU and no network: the model is a random-init 1.1B Llama built from a config
(`tiny:llama-1b`), the data is generated here. Stages, each on its own (a failing stage is recorded
and the next one runs), within a time budget (stages that would not fit are recorded as skipped):

1. the GPU: name, count, and the bf16 matmul peak measured here (an 8192^3 product), the MFU reference;
2. the `gpu`-marked tests (`pytest -m gpu`), among them a 1-GPU `tunefleet launch`;
3. the plain loop (`benchmarks/plain_loop.py`: bf16 autocast, fused AdamW, the same rows);
4. `tunefleet launch` with ddp, fsdp, deepspeed_zero3, LoRA and compiled layers on the same rows:
   tokens/s (median of the steps after the first two), MFU against the measured peak, peak GPU memory,
   time to first step and its parts (Ray start, job preparation, worker group start, preflight, model
   load, strategy setup, first step);
5. with 2+ GPUs: each strategy on 2 GPUs (NCCL) and the ddp = fsdp = zero3 loss comparison.

Writes `gpu.json` and `gpu.md` (a markdown table) into --out (default runs/gpu-check).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TUNEFLEET = str(Path(sys.executable).parent / "tunefleet") if (Path(sys.executable).parent / "tunefleet").exists() \
    else shutil.which("tunefleet") or "tunefleet"
MODEL = "tiny:llama-1b"
SEQ_LEN = 2048
STAGE_ESTIMATE_S = 45  # a launch of the 1.1B model, start to finish, on one H200
SKIP_STEPS = 2  # steps left out of the steady-state median (compilation, allocator warm-up)

# name -> recipe overrides; the order is the priority when the budget runs short
SYSTEMS = {
    "tunefleet ddp": ["parallelism.strategy=ddp"],
    "tunefleet fsdp": ["parallelism.strategy=fsdp"],
    "tunefleet deepspeed_zero3": ["parallelism.strategy=deepspeed_zero3"],
    "tunefleet ddp LoRA": ["parallelism.strategy=ddp", "method.kind=lora"],
    "tunefleet ddp + compile": ["parallelism.strategy=ddp", "parallelism.compile=true"],
    "tunefleet fsdp + compile": ["parallelism.strategy=fsdp", "parallelism.compile=true"],
}
DEFAULT_SYSTEMS = list(SYSTEMS)[:5]  # fsdp + compile on request (--systems), to stay near 6 minutes


class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def stage(results: dict, name: str, budget: Budget, needs_s: float, fn, *args):
    """Run one stage, recording its outcome; never raises."""
    if budget.left() < needs_s:
        results["stages"][name] = {"status": "skipped", "reason": f"{budget.left():.0f}s of the budget left"}
        return None
    started = time.monotonic()
    try:
        value = fn(*args)
        results["stages"][name] = {"status": "ok", "seconds": round(time.monotonic() - started, 1)}
        return value
    except Exception as exc:  # one failing stage does not stop the others
        results["stages"][name] = {"status": "failed", "seconds": round(time.monotonic() - started, 1),
                                   "error": f"{type(exc).__name__}: {exc}"[-2000:],
                                   "traceback": traceback.format_exc()[-4000:]}
        print(f"[gpu-check] {name} failed: {exc}", flush=True)
        return None


# --------------------------------------------------------------------------- stages
def measure_peak_tflops() -> dict:
    import torch

    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000 / 10
    return {"gpus": torch.cuda.device_count(), "name": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "bf16_matmul_tflops": round(2 * n**3 / seconds / 1e12, 1)}


def run_gpu_tests(out: Path) -> dict:
    log = out / "pytest-gpu.log"
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "tests/dist/test_strategies.py", "-q",
               "-p", "no:cacheprovider",
               "-o", "addopts=-ra --strict-markers"]
    with log.open("w") as handle:
        code = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, check=False).returncode
    tail = log.read_text().strip().splitlines()[-1:]
    if code != 0:
        raise RuntimeError(f"pytest -m gpu exited {code}: {tail}; see {log}")
    return {"summary": tail[0] if tail else ""}


def write_data(out: Path, num_docs: int = 2400) -> Path:
    """Synthetic prose: documents of 60-900 words from a fixed vocabulary, seeded."""
    import random

    rng = random.Random(0)
    words = ["the", "model", "of", "a", "river", "learns", "slowly", "while", "every", "town", "along", "coast",
             "counts", "its", "boats", "and", "numbers", "rise", "from", "seven", "to", "forty", "two", "before",
             "evening", "trains", "leave", "for", "northern", "valleys", "where", "old", "maps", "describe",
             "bridges", "gardens", "quiet", "markets"]
    path = out / "synthetic.jsonl"
    with path.open("w") as handle:
        for _ in range(num_docs):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(60, 900)))
            handle.write(json.dumps({"text": text}) + "\n")
    return path


def write_recipe(out: Path, data_path: Path, steps: int, micro_batch_size: int) -> Path:
    import yaml

    recipe = {
        "name": "gpu-check", "output_dir": str(out / "runs" / "base"),
        "model": {"path": MODEL},
        "method": {"kind": "full", "lora": {"r": 16, "alpha": 32}},
        "data": {"sources": [{"path": str(data_path), "format": "text"}], "max_seq_len": SEQ_LEN, "packing": True},
        "train": {"max_steps": steps, "micro_batch_size": micro_batch_size, "grad_accum_steps": 1, "lr": 1e-5,
                  "schedule": "constant", "seed": 0},
        "parallelism": {"strategy": "ddp", "num_nodes": 1, "workers_per_node": 1, "use_gpu": True,
                        "cpus_per_worker": 4, "mixed_precision": "bf16"},
        "checkpoint": {"export_final": False},
        "logging": {"every_steps": 1, "console": False, "wandb": {"mode": "disabled"}},
    }
    path = out / "gpu-check.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def prepare(recipe_path: Path) -> dict:
    """The model folder and the token cache, built once, outside every timed launch."""
    from tunefleet.launcher.config import load_recipe
    from tunefleet.launcher.data import preprocess
    from tunefleet.launcher.model import modeling
    from tunefleet.launcher.model.tiny import tiny_config

    recipe = load_recipe(recipe_path)
    model_path = modeling.resolve_model_path(recipe.model)
    data_dir = preprocess.prepare(recipe.data, modeling.load_tokenizer(model_path), model_path, recipe.train.seed)
    config = tiny_config(MODEL.removeprefix("tiny:"))
    return {"model_path": model_path, "data_dir": str(data_dir), "config": config}


def flops_per_token(config, trainable_fraction: float = 1.0) -> float:
    import torch
    import transformers

    from tunefleet.launcher.training import throughput

    with torch.device("meta"):
        num_params = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(config).parameters())
    return throughput.flops_per_token(config, num_params, int(num_params * trainable_fraction), seq_len=SEQ_LEN)


def run_plain(prepared: dict, out: Path, steps: int, micro_batch_size: int) -> dict:
    command = [sys.executable, str(REPO / "benchmarks" / "plain_loop.py"), "--model", prepared["model_path"],
               "--data-dir", prepared["data_dir"], "--steps", str(steps), "--micro-batch-size", str(micro_batch_size)]
    log = out / "plain-loop.log"
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"plain loop exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    step_rows, final = [r for r in rows if "step" in r], rows[-1]
    steady = [r["tokens"] / r["step_time_s"] for r in step_rows[SKIP_STEPS:]]
    return {"tokens_per_s": statistics.median(steady), "losses": [r["loss"] for r in step_rows],
            "peak_gib": final["peak_device_bytes"] / 2**30, "first_step_s": final["first_step_s"]}


def run_tunefleet(name: str, overrides: list[str], recipe_path: Path, out: Path, workers: int = 1) -> dict:
    slug = name.replace("tunefleet ", "").replace(" + ", "-").replace(" ", "-").lower() + f"-{workers}gpu"
    run_dir = out / "runs" / slug
    command = [TUNEFLEET, "launch", str(recipe_path), "--set", f"output_dir={run_dir}",
               "--set", f"parallelism.workers_per_node={workers}", *[a for o in overrides for a in ("--set", o)]]
    log = out / f"{slug}.log"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    with log.open("w") as handle:
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env, check=False).returncode
    if code != 0:
        raise RuntimeError(f"tunefleet launch exited {code}: {log.read_text().strip().splitlines()[-3:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r and "tokens_per_s" in r]
    steady = [r["tokens_per_s"] for r in train_rows[SKIP_STEPS:]]
    peaks = [max(r.get("peak_device_bytes_per_rank") or [0]) for r in train_rows]
    return {"tokens_per_s": statistics.median(steady), "losses": [r["loss"] for r in train_rows],
            "peak_gib": max(peaks) / 2**30, "first_step_s": (summary.get("startup_s") or {}).get("total"),
            "startup_s": summary.get("startup_s")}


# --------------------------------------------------------------------------- report
def finish_rows(results: dict, peak_tflops: float | None, flops: dict[str, float]) -> None:
    plain = results["systems"].get("plain loop (fused AdamW, bf16 autocast)", {}).get("tokens_per_s")
    for name, row in results["systems"].items():
        per_token = flops["lora"] if "LoRA" in name else flops["full"]
        if peak_tflops and row.get("tokens_per_s"):
            row["mfu"] = row["tokens_per_s"] * per_token / (peak_tflops * 1e12 * row.get("gpus", 1))
        if plain and row.get("tokens_per_s"):
            row["vs_plain"] = row["tokens_per_s"] / plain


def _cell(row: dict, key: str, spec: str) -> str:
    return format(row[key], spec) if row.get(key) is not None else "—"


def markdown(results: dict) -> str:
    env = results.get("gpu") or {}
    lines = [f"GPU check: {env.get('gpus', '?')} x {env.get('name', '?')}, torch {env.get('torch', '?')}, "
             f"measured bf16 matmul peak {env.get('bf16_matmul_tflops', '?')} TFLOP/s; model {MODEL} "
             f"(1.1B), packed {SEQ_LEN}-token rows, micro batch {results['micro_batch_size']}, bf16, "
             f"{results['steps']} steps.", "",
             "| system | GPUs | tokens/s (median) | / plain loop | MFU | peak GPU GiB | time to first step (s) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in results["systems"].items():
        cells = [_cell(row, key, spec) for key, spec in (("tokens_per_s", ",.0f"), ("vs_plain", ".3f"), ("mfu", ".1%"),
                                                         ("peak_gib", ".1f"), ("first_step_s", ".1f"))]
        lines.append(f"| {name} | {row.get('gpus', 1)} | " + " | ".join(cells) + " |")
    startups = {n: r["startup_s"] for n, r in results["systems"].items() if r.get("startup_s")}
    if startups:
        parts = list(next(iter(startups.values())))
        lines += ["", "Time to first step, by phase (s):", "",
                  "| system | " + " | ".join(p.replace("_", " ") for p in parts) + " |",
                  "|---|" + "---:|" * len(parts)]
        lines += [f"| {n} | " + " | ".join(f"{s.get(p, 0):.1f}" for p in parts) + " |" for n, s in startups.items()]
    lines += ["", "| stage | status | seconds | note |", "|---|---|---:|---|"]
    for name, st in results["stages"].items():
        note = (st.get("error") or st.get("reason") or "").replace("|", "/").replace("\n", " ")[:160]
        lines.append(f"| {name} | {st['status']} | {st.get('seconds', '')} | {note} |")
    if results.get("loss_agreement"):
        lines += ["", f"2-GPU loss agreement (max relative difference to ddp over the steps): "
                      f"{json.dumps(results['loss_agreement'])}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="tunefleet's GPU check and benchmark")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "gpu-check")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--budget-s", type=float, default=300,
                        help="start no benchmark stage after this long (the tests run after it regardless)")
    parser.add_argument("--skip-tests", action="store_true", help="leave out the pytest stage")
    parser.add_argument("--systems", nargs="*", default=DEFAULT_SYSTEMS, choices=list(SYSTEMS),
                        help="which tunefleet systems to run, in this order")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu-check needs a CUDA GPU; none found", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget_s)
    results: dict = {"stages": {}, "systems": {}, "steps": args.steps, "micro_batch_size": args.micro_batch_size}
    write = lambda: ((args.out / "gpu.json").write_text(json.dumps(results, indent=2, default=str)),  # noqa: E731
                     (args.out / "gpu.md").write_text(markdown(results)))

    results["gpu"] = stage(results, "gpu and peak", budget, 5, measure_peak_tflops)
    peak = (results["gpu"] or {}).get("bf16_matmul_tflops")
    recipe_path = write_recipe(args.out, write_data(args.out), args.steps, args.micro_batch_size)
    prepared = stage(results, "model folder and token cache", budget, 30, prepare, recipe_path)
    flops = {"full": 0.0, "lora": 0.0}
    if prepared:
        flops = {"full": flops_per_token(prepared["config"]), "lora": flops_per_token(prepared["config"], 0.0)}
        plain = stage(results, "plain loop", budget, 30, run_plain, prepared, args.out, args.steps,
                      args.micro_batch_size)
        if plain:
            results["systems"]["plain loop (fused AdamW, bf16 autocast)"] = plain
        write()
        for name in args.systems:
            row = stage(results, name, budget, STAGE_ESTIMATE_S, run_tunefleet, name, SYSTEMS[name], recipe_path,
                        args.out)
            if row:
                results["systems"][name] = row
            finish_rows(results, peak, flops)
            write()
        if (results["gpu"] or {}).get("gpus", 1) >= 2:
            for name in ("tunefleet ddp", "tunefleet fsdp", "tunefleet deepspeed_zero3"):
                row = stage(results, f"{name} on 2 GPUs", budget, STAGE_ESTIMATE_S, run_tunefleet, name,
                            SYSTEMS[name], recipe_path, args.out, 2)
                if row:
                    results["systems"][f"{name} (2 GPUs)"] = {**row, "gpus": 2}
            base = results["systems"].get("tunefleet ddp (2 GPUs)", {}).get("losses")
            if base:
                results["loss_agreement"] = {
                    n: max(abs(a - b) / abs(b) for a, b in zip(r["losses"], base, strict=False))
                    for n, r in results["systems"].items() if n.endswith("(2 GPUs)") and r.get("losses")}
    if not args.skip_tests:
        stage(results, "pytest -m gpu", Budget(300), 0, run_gpu_tests, args.out)
    finish_rows(results, peak, flops)
    write()
    print((args.out / "gpu.md").read_text())
    failed = [n for n, s in results["stages"].items() if s["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
