"""`tunefleet` command line. User mistakes print one clear message and exit 2."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tunefleet.launcher.config import Recipe, load_recipe
from tunefleet.launcher.config.checkpoint import DEFAULT_MAX_SHARD_SIZE
from tunefleet.launcher.errors import RecipeError, TrainingFailed, UserError
from tunefleet.launcher.run.submit import cancel, logs, status, submit

app = typer.Typer(
    name="tunefleet",
    help="Fine-tune Hugging Face models on many machines from one YAML recipe.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)
PIPED_WIDTH = 10_000  # columns for tables written to a file or a pipe: as wide as they need, never cut


def table_out() -> Console:
    """``out`` on a terminal; piped (a file, grep), a console so wide that no table cell is cut."""
    return out if out.is_terminal else Console(width=PIPED_WIDTH)


SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe key, e.g. --set train.lr=1e-4 (repeatable; typed by the schema)."),
]
RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]


@app.command()
def launch(
    recipe: RecipeArg,
    overrides: SetOption = None,
    address: Annotated[
        str | None, typer.Option(help="Ray cluster to join; default RAY_ADDRESS or an embedded local Ray.")
    ] = None,
    resume: Annotated[
        str, typer.Option(help="auto: continue from the latest checkpoint; never: refuse if checkpoints exist.")
    ] = "auto",
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Show Ray's and the libraries' own output too (default: <output_dir>/"
                           "launch.log).")
    ] = False,
) -> None:
    """Train: validate, plan, provision Ray workers and run the recipe."""
    if resume not in ("auto", "never"):
        raise UserError("--resume must be auto or never")
    loaded = load_recipe(recipe, overrides or [])  # a recipe mistake is reported before the heavy imports below
    from tunefleet.launcher.run.driver import launch as run_launch
    from tunefleet.launcher.training.outcome import RunState

    result = run_launch(loaded, source=str(recipe), address=address, resume=resume, verbose=verbose)
    outcome = result.outcome
    if outcome is not None and outcome.state is RunState.PREEMPTED:
        from tunefleet.launcher.training.control import EXIT_PREEMPTED

        err.print(f"preempted: checkpoint saved at step {outcome.preempted_at}; launch again to resume")
        raise typer.Exit(EXIT_PREEMPTED)


@app.command()
def plan(
    recipe: RecipeArg,
    overrides: SetOption = None,
    num_nodes: Annotated[int | None, typer.Option(help="Plan for this many nodes.")] = None,
    gpus_per_node: Annotated[int | None, typer.Option(help="Plan for GPUs: this many per node.")] = None,
    gpu_memory_gib: Annotated[float | None, typer.Option(help="Memory per GPU (default 80).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
    measure_steps: Annotated[
        int | None, typer.Option(help="Also run this many real steps on the cluster and forecast the run's time.")
    ] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster for --measure-steps.")] = None,
) -> None:
    """Per-device memory of every strategy for this recipe, and the one `strategy: auto` picks."""
    from tunefleet.launcher.cli.render import plan_command_output

    output = plan_command_output(load_recipe(recipe, overrides or []), num_nodes=num_nodes,
                                 gpus_per_node=gpus_per_node, gpu_memory_gib=gpu_memory_gib, as_json=as_json)
    forecast = None
    if measure_steps:
        from tunefleet.launcher.run.forecast import measure

        forecast = measure(recipe, overrides or [], measure_steps, address)
    if as_json:
        data = json.loads(output)
        sys.stdout.write(json.dumps({**data, "forecast": forecast} if forecast else data, indent=2) + "\n")
        return
    table_out().print(output)
    if forecast:
        out.print(f"forecast from {forecast['measured_steps']} measured steps: {forecast['step_time_s']} s/step, "
                  f"{forecast['tokens_per_s']:,.0f} tokens/s; {forecast['tokens_to_train']:,} tokens to train; "
                  f"about {forecast['forecast_total_s'] / 60:.1f} min including {forecast['startup_s']} s startup")


@app.command()
def validate(
    recipes: Annotated[list[Path], typer.Argument(help="Recipe files.", show_default=False)],
    overrides: SetOption = None,
) -> None:
    """Check recipes (schema, files, layout), with --set applied to each; list every problem. Exit 0 valid,
    2 invalid."""
    failed = False
    for path in recipes:
        try:
            loaded = load_recipe(path, overrides or [])
            from tunefleet.launcher.run.driver import check_recipe  # torch and the planner: only for a loaded recipe

            check_recipe(loaded, str(path))
            out.print(f"[green]ok[/] {path}")
        except RecipeError as exc:
            failed = True
            err.print(f"[red]invalid[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(2)


@app.command("recipes")
def list_recipes() -> None:
    """The shipped recipes: model, method, strategy, cluster and the planner's memory per GPU."""
    from tunefleet.launcher.config.catalogue import entry, shipped_recipes

    table = Table("recipe", "model", "method", "strategy", "cluster", "memory/GPU", show_edge=False)
    table.columns[0].no_wrap = True
    table.columns[-1].justify = "right"
    for path in shipped_recipes():
        row = entry(path)
        table.add_row(row.name, row.model, row.method, row.strategy, row.cluster, row.memory)
    wide = out if out.is_terminal else Console(width=200)  # piped output (grep, files): one recipe a line
    wide.print(table)
    out.print("memory/GPU: the planner's estimate for the recipe's strategy on the cluster it names; "
              "copy one to edit with `tunefleet init --from NAME`", style="dim")


@app.command()
def init(
    name: Annotated[str, typer.Option("--from", help="A shipped recipe, as `tunefleet recipes` names it.",
                                      show_default=False)],
    dest: Annotated[Path | None, typer.Option("--out", help="File (or folder) to write; default ./NAME.yaml.")] = None,
) -> None:
    """Copy a shipped recipe to edit; never overwrites a file."""
    from tunefleet.launcher.config.catalogue import copy_recipe

    written = copy_recipe(name, dest)
    out.print(f"wrote {written}; edit it, then: tunefleet validate {written}", highlight=False)


@app.command("runs")
def list_runs(folder: Annotated[Path, typer.Argument(help="A run folder or a folder of runs.")] = Path("runs")) -> None:
    """List runs with their folder, start of the latest launch, state (running, finished, stopped early, failed,
    preempted), last step, checkpoint, restarts."""
    from tunefleet.launcher.run.folders import find_runs

    found = find_runs(folder) if folder.exists() else []
    if not found:
        raise UserError(f"no runs under {folder}; pass the output_dir of a launch or a folder holding several")
    table = Table("run", "folder", "started", "state", "step", "loss", "last checkpoint", "restarts", show_edge=False)
    for run in found:
        loss = f"{run['last_loss']:.4f}" if run["last_loss"] is not None else "-"
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run["started"])) if run["started"] else "-"
        table.add_row(run["name"], run["run"], started, run["state"], f"{run['last_step']}/{run['max_steps']}", loss,
                      run["last_checkpoint"] or "-", str(run["restarts"]))
    table_out().print(table)


@app.command("preprocess")
def preprocess_data(recipe: RecipeArg, overrides: SetOption = None) -> None:
    """Tokenize a recipe's data into the cache now, as a launch would first; print rows, tokens and drops."""
    from tunefleet.launcher.cli.render import data_report
    from tunefleet.launcher.data.preprocess import preprocess_report

    data_report(preprocess_report(load_recipe(recipe, overrides or [])), out)


@app.command("eval")
def evaluate_model(
    target: Annotated[Path, typer.Argument(help="A run's output_dir (evaluates its final/ with the recorded recipe), "
                                           "or an exported model or adapter folder.", show_default=False)],
    data_file: Annotated[Path, typer.Option("--data", help="Rows to evaluate on, in the recipe's data format "
                                            "(.jsonl, .json, .parquet, .csv or a folder).", show_default=False)],
    metrics: Annotated[list[str] | None, typer.Option("--metric", help="Show only this figure, e.g. eval_loss "
                                                      "(repeatable); default every figure the recipe reports.")] = None,
    recipe: Annotated[Path | None, typer.Option(help="The recipe the model was trained with; default the run's "
                                                "recorded recipe.resolved.yaml.")] = None,
    overrides: SetOption = None,
    output: Annotated[Path | None, typer.Option(help="Also write the figures to this JSON file.")] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster to join; default RAY_ADDRESS or an embedded "
                                                "local Ray.")] = None,
) -> None:
    """Evaluate an exported model or adapter on a file with the code and strategy training uses."""
    from tunefleet.launcher.run.eval import run_eval

    report = run_eval(target, data_file, metrics=metrics or [], recipe_file=recipe, overrides=overrides or [],
                      address=address)
    write_eval_report(report, output)


def write_eval_report(report: dict, output: Path | None) -> None:
    """`tunefleet eval`'s figures as a table on the console, and its JSON report at ``output``."""
    out.print(f"[bold]{report['model']}[/] on {report['data']}: {report['eval_rows']} rows, "
              f"{report['strategy']} on {report['world_size']} worker(s)", highlight=False, soft_wrap=True)
    table = Table("metric", "value", show_edge=False)
    table.columns[1].justify = "right"
    for name, value in report["metrics"].items():
        table.add_row(name, f"{value:.4f}")
    out.print(table)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2) + "\n")
        out.print(f"wrote {output}", highlight=False)


@app.command()
def schema() -> None:
    """Print the recipe's JSON Schema (for editors)."""
    sys.stdout.write(json.dumps(Recipe.model_json_schema(), indent=2) + "\n")


@app.command("export")
def export_checkpoint(
    run_dir: Annotated[Path, typer.Argument(help="The run's output_dir (holds recipe.resolved.yaml).",
                                            show_default=False)],
    step: Annotated[int | None, typer.Option(help="Checkpoint step to export; default the latest complete one.")]
    = None,
    *,
    out_dir: Annotated[Path, typer.Option("--out", help="New folder for the Hugging Face model or adapter.",
                                          show_default=False)],
    merge_lora: Annotated[bool, typer.Option("--merge-lora", help="LoRA runs: write the base model with the "
                                             "adapters merged in instead of an adapter folder.")] = False,
    dtype: Annotated[str, typer.Option(help="Dtype of the written weights: fp32 or bf16.")] = "fp32",
    max_shard_size: Annotated[str, typer.Option(help="Split the weights into files of at most this size "
                                                "(e.g. 500MB, 5GB), with an index.")] = DEFAULT_MAX_SHARD_SIZE,
) -> None:
    """Turn a checkpoint of any strategy into a Hugging Face folder (safetensors, config, tokenizer)."""
    from tunefleet.launcher.run.export import export

    report = export(run_dir, step=step, out=out_dir, merge_lora=merge_lora, dtype=dtype,
                    max_shard_size=max_shard_size)
    out.print(
        f"exported {Path(report.checkpoint).name} ({report.strategy}, {report.kind}, {report.dtype}) to "
        f"{report.out_dir}: {report.num_tensors} tensors, {report.total_bytes / 2**20:.1f} MiB in "
        f"{len(report.files)} file(s); peak memory {report.peak_rss_bytes / 2**20:.0f} MiB "
        f"(+{report.peak_extra_bytes / 2**20:.0f} MiB) in {report.seconds:.1f} s", highlight=False, soft_wrap=True,
    )


app.command()(submit)
app.command()(status)
app.command()(logs)
app.command()(cancel)


def main() -> None:
    import os

    from tunefleet.strategies.compat import deepspeed_env

    for name, value in deepspeed_env(any(os.path.exists(dev) for dev in ("/dev/nvidiactl", "/dev/kfd"))).items():
        os.environ.setdefault(name, value)
    try:
        app()
    except (UserError, TrainingFailed) as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


