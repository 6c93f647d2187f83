"""What the user sees during `tunefleet launch`: a header, a live progress bar
fed by rank 0's metrics, and a summary table at the end."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from tunefleet.launcher.data.preprocess import skipped_lines
from tunefleet.launcher.training.outcome import Outcome

# Evaluation figures beyond the loss that the summary shows before and after training.
TASK_METRICS = ("eval_accuracy", "eval_f1", "eval_reward_accuracy", "eval_reward", "eval_exact_match",
                "eval_contains_match", "reference_perplexity")


class LaunchConsole:
    def __init__(self, enabled: bool = True, console: Console | None = None):
        self.enabled = enabled
        self.console = console or Console(stderr=False)
        self.train_rows: dict[int, dict] = {}
        self.eval_rows: dict[int, dict] = {}
        self.outcome: Outcome | None = None  # rank 0's last words (the "finish" event)
        self.restarts = 0
        self.started = False  # a start event came: another one is a restart of the worker group
        self.first_steps: set[int] = set()
        self.ray_log: str | None = None  # where Ray's own output of the run goes, named in restart lines
        self._max_steps = 0
        self.max_restarts: int | None = None

    def keep_terminal(self) -> None:
        """Write to a copy of the current standard output, so that the console stays on the terminal (or pipe)
        while the launch sends everything else written to standard output to its log file."""
        terminal, width = self.console.is_terminal, self.console.width
        self.console = Console(file=open(os.dup(1), "w", buffering=1), force_terminal=terminal or None,  # noqa: SIM115
                               width=width)

    def header(self, job, reason: str, data_meta: dict, *, dashboard: str | None = None) -> None:
        recipe, plan = job.recipe, job.strategy_plan
        self.max_restarts = recipe.fault_tolerance.max_restarts
        packed = (f"; packed into {data_meta['max_seq_len']}-token rows, {data_meta['packing_efficiency']:.1%} "
                  "of token slots filled" if data_meta.get("packing") else "")
        self._print(
            f"[bold]tunefleet[/] {recipe.name}: {recipe.method.kind} fine-tuning of {recipe.model.path}\n"
            f"  strategy [cyan]{plan.name}[/] ({reason}); {plan.world_size} worker(s) = "
            f"{plan.num_nodes} node(s) x {plan.workers_per_node}\n"
            f"  data: {data_meta['train_rows']} rows, {data_meta['train_tokens']} tokens "
            f"({data_meta['truncated']} truncated), {data_meta['eval_rows']} eval rows"
            f"{packed}\n"
            f"  global batch {plan.global_batch_rows} rows "
            f"(micro {plan.micro_batch_size} x accum {plan.grad_accum_steps} x {plan.world_size} workers)\n"
            f"  output: {recipe.output_dir}" + (f"\n  Ray dashboard: {dashboard}" if dashboard else "")
        )
        for line in skipped_lines(data_meta) if self.enabled else []:
            self.console.print(f"  {line}", highlight=False, soft_wrap=True, markup=False)

    def _print(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False, soft_wrap=True)

    @contextlib.contextmanager
    def progress(self, max_steps: int) -> Iterator[LaunchConsole]:
        self._max_steps = max_steps
        self._bar = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[stats]}"),
            console=self.console, disable=not self.enabled,
        )
        self._task = self._bar.add_task("train", total=max_steps, stats="starting workers...")
        with self._bar:
            yield self

    def update(self, events: list[dict]) -> None:
        for event in events:
            kind = event.get("event")
            if kind == "start":
                self._started(event)
            elif kind == "metrics":
                self._record(event)
            elif kind == "finish":
                self.outcome = event["outcome"]
            elif kind == "worker_failed":
                self._bar.console.print(f"[red]worker failed[/]: {escape(event['line'])}", highlight=False,
                                        soft_wrap=True)

    def _started(self, event: dict) -> None:
        """A worker group started: the first one, or a restart after a failure (one line, not Ray's traceback)."""
        self.first_steps.add(event.get("start_step", 0) + 1)  # an attempt's first step: start-up, not speed
        where = event.get("resumed_from")
        if self.started:
            self.restarts += 1
            allowed = f"/{self.max_restarts}" if self.max_restarts is not None else ""
            self._bar.console.print(
                f"[yellow]restart {self.restarts}{allowed}[/] from {where or 'step 0 (no checkpoint)'}"
                + (f"; Ray's report is in {self.ray_log}" if self.ray_log else ""), soft_wrap=True)
        elif where:
            self._bar.console.print(f"resuming from {where}", soft_wrap=True)
        self.started = True

    def _record(self, row: dict) -> None:
        step = row["step"]
        if "eval_loss" in row:
            self.eval_rows[step] = row
        if "loss" in row:
            self.train_rows[step] = row
            stats = f"loss {row['loss']:.4f}  {row['tokens_per_s']:,.0f} tok/s"
            self._bar.update(self._task, completed=step, stats=stats)

    def summary(self, output_dir: Path, wall_time_s: float) -> dict:
        steps = sorted(self.train_rows)
        rows = [self.train_rows[s] for s in steps]
        evals = run_evaluations(output_dir / "metrics.jsonl") or [self.eval_rows[s] for s in sorted(self.eval_rows)]
        evals = [evals[0], *[e for e in evals[1:] if e["step"] > evals[0]["step"]]] if evals else []
        summary = {
            "steps": steps[-1] if steps else 0,
            "tokens": rows[-1]["tokens_seen"] if rows else 0,
            "tokens_per_s": trained_tokens_per_s(rows, self.first_steps),
            "restarts": self.restarts,
            "first_loss": rows[0]["loss"] if rows else None,
            "last_loss": rows[-1]["loss"] if rows else None,
            "eval_loss_before": evals[0]["eval_loss"] if evals else None,
            "eval_loss_after": evals[-1]["eval_loss"] if len(evals) > 1 else None,
            **{f"{key}_{when}": row[key] for key in TASK_METRICS for when, row in
               (("before", evals[0] if evals else {}), ("after", evals[-1] if len(evals) > 1 else {}))
               if key in row},
            **({"reference_perplexity_change": evals[-1]["reference_perplexity_change"]}
               if evals and "reference_perplexity_change" in evals[-1] else {}),
            "packing_efficiency": (statistics.fmean(fills) if (fills := [r["packing_efficiency"] for r in rows
                                                                          if "packing_efficiency" in r]) else None),
            "wall_time_s": round(wall_time_s, 1),
            "output_dir": str(output_dir),
            "final_dir": self.outcome.final_dir if self.outcome is not None else None,
            "metrics": str(output_dir / "metrics.jsonl"),
            **self._best_lines(),
        }
        if summary.get("stopped_early_at"):
            self._print(f"[bold]stopped early[/] at step {summary['stopped_early_at']} of {self._max_steps}: "
                        f"no better {summary['best_metric']} in {summary['evals_without_improvement']} "
                        f"evaluation(s); best {summary['best_value']:.4f} at step {summary['best_step']}")
        self._print_summary(summary)
        return summary

    def _best_lines(self) -> dict:
        """Early stopping and the best checkpoint, when the run followed a metric."""
        outcome = self.outcome
        if outcome is None or not outcome.best:
            return {}
        best = outcome.best
        lines = {"stopped_early_at": outcome.stopped_early_at, "best_metric": best["metric"],
                 "best_value": best["value"], "best_step": best["step"],
                 "evals_without_improvement": best["evals_without_improvement"]}
        if outcome.final_step is not None:
            lines["final_from_step"] = outcome.final_step
        return lines

    def _print_summary(self, summary: dict) -> None:
        table = Table(title="tunefleet run summary", show_header=False)
        for key, value in summary.items():
            text = f"{value:.4f}" if isinstance(value, float) else str(value)
            table.add_row(key.replace("_", " "), text)
        if self.enabled:
            self.console.print(table)


def trained_tokens_per_s(rows: list[dict], first_steps: set[int]) -> float | None:
    """Tokens over seconds of the steps this launch trained (the last attempt's, for replayed steps),
    leaving out each attempt's first step (start-up and compilation, not speed)."""
    timed = [r for r in rows if r["step"] not in first_steps and r.get("step_time_s")] or rows
    seconds = sum(r["step_time_s"] for r in timed if r.get("step_time_s"))
    return sum(r["tokens_per_s"] * r["step_time_s"] for r in timed if r.get("step_time_s")) / seconds \
        if seconds else None


def run_evaluations(metrics_file: Path) -> list[dict]:
    """The run's evaluations in step order, from its history (earlier launches of a resumed run too)."""
    if not metrics_file.is_file():
        return []
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    by_step = {r["step"]: r for r in rows if "eval_loss" in r}
    return [by_step[s] for s in sorted(by_step)]
