"""How the commands show their reports: rich tables for `tunefleet plan` and `tunefleet preprocess`."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

from tunefleet.launcher.data import preprocess
from tunefleet.launcher.plan import memory_fit
from tunefleet.launcher.plan.memory_fit import PlanReport, count_text, gib, row_name


# --------------------------------------------------------------------------- tunefleet plan
def plan(report: PlanReport) -> Group:
    """The plan as a rich table (one row per strategy) and the choice below it."""
    title = (
        f"{report.model_path} ({report.method}): {count_text(report.num_params)} params, "
        f"{count_text(report.num_trainable_params)} trainable; {report.num_nodes} node(s) x "
        f"{report.workers_per_node} {report.device} worker(s), {gib(report.capacity_bytes)} {report.per}"
    )
    table = Table(title=title, title_justify="left")
    for column in ("strategy", "params", "grads", "optimizer", "activations", "buffers", "offloaded"):
        table.add_column(column, justify="left" if column == "strategy" else "right")
    table.add_column(f"total {report.per}", justify="right", style="bold")
    table.add_column("host per worker", justify="right")
    table.add_column("fits")
    for row in report.rows:
        m = row.memory
        verdict = ("[green]yes[/]" if row.fits else "[red]no[/]") + (f" [dim]({row.blocked})[/]" if row.blocked else "")
        parts = (m.params_bytes, m.grads_bytes, m.optimizer_bytes, m.activations_bytes, m.buffers_bytes,
                 m.offloaded_bytes, row.need_bytes, row.host_bytes)
        table.add_row(row_name(row), *(gib(part) for part in parts), verdict)
    style = "green" if report.choice else "red"
    choice = Text.assemble(("choice: ", "bold"), (report.choice or "none", f"bold {style}"), f" ({report.reason})")
    return Group(table, choice)


def plan_command_output(
    recipe,
    *,
    num_nodes: int | None = None,
    gpus_per_node: int | None = None,
    gpu_memory_gib: float | None = None,
    as_json: bool = False,
) -> str | Group:
    """What `tunefleet plan` prints: JSON text of the PlanReport, or a rich renderable."""
    report = memory_fit.plan_report(recipe, num_nodes=num_nodes, gpus_per_node=gpus_per_node,
                                    gpu_memory_gib=gpu_memory_gib)
    return report.model_dump_json(indent=2) if as_json else plan(report)


# --------------------------------------------------------------------------- tunefleet preprocess
def data_report(report: dict, console) -> None:
    """Per-source rows and the totals as rich tables."""
    table = Table(title="data sources")
    table.add_column("source", overflow="fold")
    for name in ("read", "kept", "skipped", "truncated", "dropped", "rows/epoch"):
        table.add_column(name, justify="right")
    for s in report["sources"]:
        table.add_row(s["source"], *(f"{s[k]:,}" for k in ("read", "kept", "skipped", "truncated", "dropped",
                                                            "epoch_rows")))
    console.print(table)
    totals = Table(show_header=False, title="prepared data")
    for key in ("kind", "train_rows", "train_tokens", "train_target_tokens", "eval_rows", "skipped", "truncated",
                "dropped", "packing", "packing_efficiency", "cache_dir", "reused", "seconds"):
        value = report[key]
        totals.add_row(key.replace("_", " "), f"{value:,}" if type(value) is int else str(value))
    console.print(totals)
    for line in preprocess.skipped_lines(report):
        console.print(line, highlight=False, soft_wrap=True, markup=False)
