"""Render docs/benchmarks.md and its PNG plots from the benchmarks' JSON results.

    python benchmarks/report.py [--json-dir docs/benchmarks] [--out docs/benchmarks.md]

The peers section (tables, targets, machine, versions, commands) is computed
from ``peers.json``; the interpretive text of every section lives in
``templates/benchmarks.md.j2``. Plots go next to the JSON (Agg backend, no
display) and are linked relatively, ``benchmarks/<name>.png``, so the page
renders the same on GitHub and in the docs site.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jinja2
from gpu import markdown as gpu_markdown
from harness import REPO, cell, median, ratio

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "templates" / "benchmarks.md.j2"
LABELS = {"tunefleet-ddp": "tunefleet ddp", "torchrun": "hand-written torchrun DDP",
          "trl": "TRL SFTTrainer + Accelerate", "tunefleet-fsdp": "tunefleet fsdp",
          "tunefleet-deepspeed_zero3": "tunefleet deepspeed_zero3"}
MIB = 2**20
DDP_FLOOR_TARGET = 0.95  # tunefleet ddp tokens/s over the hand-written loop's
TRL_TARGET = 1.0  # tunefleet ddp tokens/s over TRL's


def cpu_mfu(result: dict, system: str) -> float | None:
    """MFU per CPU-second the ranks got: tokens per rank CPU-second x FLOPs per token over one core's peak.

    Wall-clock MFU on a shared machine mostly says how many cores the ranks
    were given; this says how well they used the ones they had.
    """
    values = [r["tokens_per_rank_cpu_s"] * r["flops_per_token"] / result["peak_flops_per_rank"]
              for r in result["runs"] if r["system"] == system and r.get("tokens_per_rank_cpu_s") is not None]
    return median(values)


def table_rows(result: dict) -> list[dict[str, str]]:
    """One row of formatted cells per system, in the order the systems ran."""
    medians, ratios = result["medians"], result["ratios"]
    rows = []
    for system in result["config"]["systems"]:
        med = medians[system]
        per_round = [r.get("tokens_per_s") for r in result["runs"] if r["system"] == system]
        rows.append({
            "system": LABELS.get(system, system),
            "tokens_per_s": cell("{:,.1f}", med["tokens_per_s"]),
            "per_round": ", ".join(cell("{:,.0f}", v) for v in per_round),
            "vs_torchrun": cell("{:.3f}", ratios.get("torchrun", {}).get(system, {}).get("tokens_per_s")),
            "vs_trl": cell("{:.3f}", ratios.get("trl", {}).get(system, {}).get("tokens_per_s")),
            "tokens_per_rank_cpu_s": cell("{:,.1f}", med["tokens_per_rank_cpu_s"]),
            "first_step_s": cell("{:.1f}", med["first_step_s"]),
            "peak_rss_mib": cell("{:,.0f}", None if med["peak_rss_bytes"] is None else med["peak_rss_bytes"] / MIB),
            "held_mib": cell("{:,.1f}", None if med["held_bytes"] is None else med["held_bytes"] / MIB),
            "mfu": cell("{:.1%}", med["mfu"]),
            "cpu_mfu": cell("{:.1%}", cpu_mfu(result, system)),
            "rank_cpu_cores": cell("{:.2f}", med["rank_cpu_cores"]),
            "cpu_vs_torchrun": cell("{:.3f}", ratios.get("torchrun", {}).get(system, {}).get("tokens_per_rank_cpu_s")),
            "cpu_vs_trl": cell("{:.3f}", ratios.get("trl", {}).get(system, {}).get("tokens_per_rank_cpu_s")),
            "packing_efficiency": cell("{:.1%}", med["packing_efficiency"]),
            "loss_step_1": cell("{:.4f}", med["loss_step_1"]),
        })
    return rows


def targets(result: dict) -> list[dict]:
    """The issue's targets, each with the measured value and whether it was met (None: not measured)."""
    med = result["medians"]

    def of(system: str, key: str) -> float | None:
        return med.get(system, {}).get(key)

    def verdict(value: float | None, ok) -> dict:
        return {"value": value, "met": None if value is None else ok(value)}

    ddp, floor, trl = "tunefleet-ddp", "torchrun", "trl"
    return [
        {"target": f"tunefleet ddp tokens/s >= {DDP_FLOOR_TARGET}x the hand-written loop's", "fmt": "{:.3f}x",
         **verdict(ratio(of(ddp, "tokens_per_s"), of(floor, "tokens_per_s")), lambda v: v >= DDP_FLOOR_TARGET)},
        {"target": f"tunefleet ddp tokens/s >= {TRL_TARGET}x TRL + Accelerate's", "fmt": "{:.3f}x",
         **verdict(ratio(of(ddp, "tokens_per_s"), of(trl, "tokens_per_s")), lambda v: v >= TRL_TARGET)},
        {"target": f"(same, per rank CPU-second) tunefleet ddp >= {DDP_FLOOR_TARGET}x the hand-written loop",
         "fmt": "{:.3f}x", **verdict(ratio(of(ddp, "tokens_per_rank_cpu_s"), of(floor, "tokens_per_rank_cpu_s")),
                                     lambda v: v >= DDP_FLOOR_TARGET)},
        {"target": f"(same, per rank CPU-second) tunefleet ddp >= {TRL_TARGET}x TRL + Accelerate", "fmt": "{:.3f}x",
         **verdict(ratio(of(ddp, "tokens_per_rank_cpu_s"), of(trl, "tokens_per_rank_cpu_s")),
                   lambda v: v >= TRL_TARGET)},
        {"target": "tunefleet ddp time to first step < TRL + Accelerate's", "fmt": "{:.2f}x",
         **verdict(ratio(of(ddp, "first_step_s"), of(trl, "first_step_s")), lambda v: v < 1.0)},
        {"target": "MFU reported for every row", "fmt": "{:.0f} of " + str(len(med)) + " rows",
         **verdict(float(sum(m["mfu"] is not None for m in med.values())), lambda v: v == len(med))},
    ]


def plot(result: dict, out_dir: Path) -> dict[str, str]:
    """Tokens/s (wall, per rank CPU-s), time to first step per system: median bar, rounds as dots; key -> path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = result["config"]["systems"]
    written = {}
    for key, title, name in (("tokens_per_s", "steady-state tokens/s (2 ranks)", "peers_tokens_per_s.png"),
                             ("tokens_per_rank_cpu_s", "tokens per CPU-second of the 2 ranks",
                              "peers_tokens_per_cpu_s.png"),
                             ("first_step_s", "time from command to first optimizer step (s)",
                              "peers_first_step.png")):
        fig, ax = plt.subplots(figsize=(8, 3.6), dpi=110)
        for i, system in enumerate(systems):
            values = [r[key] for r in result["runs"] if r["system"] == system and r.get(key) is not None]
            median = result["medians"][system][key]
            if median is not None:
                ax.bar(i, median, color="tab:blue" if system.startswith("tunefleet") else "tab:gray", alpha=0.7)
            ax.scatter([i] * len(values), values, color="black", s=14, zorder=3)
        ax.set_xticks(range(len(systems)), [LABELS.get(s, s).replace(" + ", "\n+ ") for s in systems], fontsize=7)
        ax.set_title(f"{title}; bar: median, dots: rounds", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        out_dir.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_dir / name)
        plt.close(fig)
        written[key] = f"{out_dir.name}/{name}"
    return written


def render(result: dict | None, images: dict[str, str], raw_files: list[dict], gpu: dict | None = None,
           quiet: dict | None = None, ray_floor: dict | None = None) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE.parent), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)
    env.filters["mib"] = lambda b: cell("{:,.0f}", None if b is None else b / MIB)
    env.filters["cell"] = lambda value, fmt: cell(fmt, value)
    env.filters["ratio"] = ratio
    other_cores = {s: median([r.get("other_cpu_cores") for r in result["runs"] if r["system"] == s])
                   for s in result["config"]["systems"]} if result else {}
    return env.get_template(TEMPLATE.name).render(
        peers=result, rows=table_rows(result) if result else [], targets=targets(result) if result else [],
        images=images, labels=LABELS, raw_files=raw_files, other_cores=other_cores,
        gpu=gpu, gpu_table=gpu_markdown(gpu) if gpu else "", quiet=quiet, quiet_rows=table_rows(quiet) if quiet else [],
        quiet_targets=targets(quiet) if quiet else [], ray_floor=ray_floor)


def raw_files(json_dir: Path) -> list[dict]:
    """Every JSON result: its file, date and command, for the page's index of raw figures."""
    found = []
    for path in sorted(json_dir.glob("*.json")):
        data = json.loads(path.read_text())
        # Each script words it its own way: a top-level "date", or one inside "machine" or "environment".
        nested = [d.get("date") for d in (data.get("machine"), data.get("environment")) if isinstance(d, dict)]
        date = data.get("date") or next(filter(None, nested), None)
        found.append({"file": f"{json_dir.name}/{path.name}", "date": date, "command": data.get("command")})
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json-dir", type=Path, default=REPO / "docs" / "benchmarks", help="Folder of JSON results.")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md", help="Markdown page to write.")
    args = parser.parse_args(argv)
    peers_json = args.json_dir / "peers.json"
    result = json.loads(peers_json.read_text()) if peers_json.is_file() else None
    images = plot(result, args.json_dir) if result else {}
    gpu_json, quiet_json = args.json_dir / "gpu.json", args.json_dir / "peers_quiet.json"
    gpu = json.loads(gpu_json.read_text()) if gpu_json.is_file() else None
    quiet = json.loads(quiet_json.read_text()) if quiet_json.is_file() else None
    ray_floor_json = args.json_dir / "ray_train_floor.json"
    ray_floor = json.loads(ray_floor_json.read_text()) if ray_floor_json.is_file() else None
    args.out.write_text(render(result, images, raw_files(args.json_dir), gpu, quiet, ray_floor))
    print(f"wrote {args.out}" + "".join(f", {args.json_dir.parent / p}" for p in images.values()))


if __name__ == "__main__":
    main()
