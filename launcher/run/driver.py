"""The driver: recipe -> checks -> plan -> prepared model/data -> Ray Train.

Everything that can fail because of the user's input fails here, before an
output folder is written or a worker started.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tunefleet.launcher.config import RESOLVED_RECIPE, Recipe
from tunefleet.launcher.data import batches, formats, sources
from tunefleet.launcher.errors import PreflightError, Problem, RecipeError, TrainingFailed, UserError
from tunefleet.launcher.model import modeling
from tunefleet.launcher.objectives.rl_rewards import RewardError, check_rewards
from tunefleet.launcher.objectives.select import reward_specs
from tunefleet.launcher.plan.layout import LaunchPlan, make_plan, rebalance
from tunefleet.launcher.plan.memory_fit import PlanReport
from tunefleet.launcher.run import folders, session, tokenize_task
from tunefleet.launcher.run.console import LaunchConsole
from tunefleet.launcher.training import checkpoint
from tunefleet.launcher.training.control import EXIT_PREEMPTED, forward_signals_to
from tunefleet.launcher.training.job import STARTUP_FILE, Job
from tunefleet.launcher.training.metrics import WandbRun
from tunefleet.launcher.training.outcome import Outcome, RunState
from tunefleet.launcher.training.preflight import package_versions


def input_problems(recipe: Recipe) -> list[Problem]:
    """Missing files and folders the recipe points at, all at once."""
    problems = []
    model_problem = modeling.check_model_path(recipe.model) or modeling.check_tiny_spec(recipe.model)
    if model_problem:
        problems.append(Problem("model.path", model_problem))
    problems += sources.path_problems(recipe.data)
    return problems or reward_problems(recipe)  # rewards read the data: only once the files are there


def reward_problems(recipe: Recipe) -> list[Problem]:
    """Online RL: every reward loads here and scores an empty completion of the first prompt row once, so
    a missing module, a typo in a name or a reward that raises or returns no number fails before Ray starts."""
    if not recipe.method.online_rl:
        return []
    source = recipe.data.sources[0]
    row = {"prompt": "", "answer": ""}
    if source.path is not None:
        first = next((r for _, r in sources.read_source(source) if isinstance(r, dict)), {})
        row = {**formats.other_fields(first, source),  # as a reward sees the row in training
               **{name: _as_text(first.get(source.fields.get(name, name))) for name in row}}
    try:
        check_rewards(reward_specs(recipe.method.rl), row, prompt=row["prompt"])
    except RewardError as exc:
        return [Problem("method.rl.reward", str(exc))]
    return []


def _as_text(value) -> str:
    """A prompt or answer field as a reward sees it (chat turns: the last message's text)."""
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        return str(value[-1].get("content", ""))
    return "" if value is None else str(value)


def check_recipe(recipe: Recipe, source: str, *, on_this_machine: bool = False) -> LaunchPlan:
    """Raise RecipeError with every input and layout problem; return the plan.
    ``on_this_machine``: also check this machine's GPUs (an embedded Ray runs the workers here)."""
    problems = input_problems(recipe)
    try:
        plan = make_plan(recipe, source, on_this_machine=on_this_machine)
    except RecipeError as exc:
        problems.extend(exc.problems)
    if problems:
        raise RecipeError(source, problems)
    return plan


def refuse_to_resume(existing: Path | None, recipe: Recipe, resume: str) -> None:
    """``--resume never`` with a checkpoint in the checkpoint folder: a UserError naming it."""
    if existing is not None and resume == "never":
        raise UserError(
            f"{recipe.checkpoint_dir} already holds checkpoints (latest {existing.name}); "
            "use --resume auto to continue, or a new output_dir"
        )


@dataclass(frozen=True)
class LaunchResult:
    output_dir: str
    summary: dict
    outcome: Outcome | None = None  # how the workers ended (None: they never said)


def prepare_job(recipe: Recipe, launch_plan: LaunchPlan, resume: str,
                memory: Future[PlanReport]) -> tuple[Job, str]:
    """With Ray up and the recipe checked (``check_recipe``): settle the plan against any checkpoint,
    then tokenize once, as a Ray task on this node (bad rows raise DataError here). ``memory``: the
    planner's report, being made since before Ray's start."""
    plan, reason = launch_plan.strategy, launch_plan.reason
    existing = checkpoint.latest(recipe.checkpoint_dir)
    refuse_to_resume(existing, recipe, resume)
    if existing is not None:
        saved_rows = checkpoint.read_meta(existing).get("global_batch_rows", plan.global_batch_rows)
        if saved_rows != plan.global_batch_rows:
            plan = rebalance(plan, world_size=plan.world_size, global_rows=saved_rows)
            reason += f"; accumulation set to {plan.grad_accum_steps} to keep the checkpoint's global batch"
    wandb_run_id = checkpoint.read_meta(existing).get("wandb_run_id") if existing else None
    model_path = modeling.resolve_model_path(recipe.model)
    data_dir = tokenize_task.prepare_on_ray(recipe.data, model_path, seed=recipe.train.seed)
    report = memory.result()
    job = Job(
        recipe=recipe, strategy_plan=plan,
        host_bytes_needed=report.row_for(plan.name).host_bytes * report.workers_per_node,
        attachments={"planner": report.model_dump(mode="json")}, model_path=model_path, data_dir=str(data_dir),
        wandb_run_id=wandb_run_id or uuid.uuid4().hex[:12], launch_id=uuid.uuid4().hex[:12],
        driver_versions=package_versions(),
    )
    return job, reason


LAUNCH_LOG = "launch.log"


@contextlib.contextmanager
def library_output_to(path: Path | None) -> Iterator[None]:
    """Send this process's standard output and error (Ray's forwarded worker logs and error reports, library
    warnings and banners) to ``path``, appending. The launch console keeps the terminal (see
    ``LaunchConsole.keep_terminal``). None: no change."""
    if path is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    with path.open("ab") as log:
        for fd in saved:
            os.dup2(log.fileno(), fd)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)


def launch(recipe: Recipe, *, source: str, address: str | None = None, resume: str = "auto",
           console: LaunchConsole | None = None, verbose: bool = True) -> LaunchResult:
    """``verbose``: leave Ray's and the libraries' output on standard error; otherwise it goes to
    ``<output_dir>/launch.log`` and the console shows tunefleet's lines only."""
    console = console or LaunchConsole(enabled=recipe.logging.console)
    address = session.cluster_address(recipe, address)
    # --resume never: refused before the checks and Ray, and again in prepare_job (a checkpoint may appear meanwhile)
    refuse_to_resume(checkpoint.latest(recipe.checkpoint_dir), recipe, resume)
    plan = check_recipe(recipe, source, on_this_machine=address is None)  # before Ray starts
    started = time.time()
    output_dir = Path(recipe.output_dir)
    library_log = None if verbose else Path(tempfile.mkstemp(prefix="tunefleet-launch-", suffix=".log")[1])
    console.ray_log = None if verbose else str(output_dir / LAUNCH_LOG)
    if not verbose:
        console.keep_terminal()
    try:
        with library_output_to(library_log):
            return _launch_on_ray(recipe, plan, console, address=address, resume=resume, started=started)
    finally:
        if library_log is not None:
            _keep_log(library_log, output_dir / LAUNCH_LOG)


def _keep_log(written: Path, kept: Path) -> None:
    """Append this launch's library output to the run folder's log (when the run got a folder); drop the temp."""
    if kept.parent.is_dir() and written.stat().st_size:
        with kept.open("ab") as out:
            out.write(written.read_bytes())
    written.unlink(missing_ok=True)


def _launch_on_ray(recipe: Recipe, plan: LaunchPlan, console: LaunchConsole, *,
                   address: str | None, resume: str, started: float) -> LaunchResult:
    import ray

    planner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tunefleet-planner")
    # the planner's report (a model built on the meta device, ~2 s of imports) is made while Ray starts
    memory = planner.submit(plan.memory_report, recipe)
    planner.shutdown(wait=False)
    dashboard = session.connect(recipe, address)
    phases = {"launch": started, "ray_ready": time.time()}
    try:
        job, reason = prepare_job(recipe, plan, resume, memory)
        phases["job_prepared"] = time.time()
        output_dir = Path(recipe.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / STARTUP_FILE).unlink(missing_ok=True)  # this launch's phases only
        (output_dir / RESOLVED_RECIPE).write_text(_resolved_yaml(recipe, job, reason))
        folders.record_state(output_dir, "running", name=recipe.name, max_steps=recipe.train.max_steps,
                             checkpoint_dir=recipe.checkpoint_dir, ray_dashboard=dashboard)
        console.header(job, reason, batches.cache_meta(Path(job.data_dir)), dashboard=dashboard)
        hub = session.hub()
        forward_signals_to(hub, on_signal=lambda _: _exit_after_grace(recipe, console))
        trainer = session.worker_group(job, hub, secret_store=session.secret_store(),
                                       state_api=dashboard is not None, autoscaler=address is not None)
        thread, failure = session.fit_in_background(trainer)
        tracker = WandbRun(recipe.logging.wandb, output_dir=str(output_dir), run_id=job.wandb_run_id,
                           name=recipe.name, config=recipe.model_dump(mode="json"))
        with console.progress(recipe.train.max_steps) as progress:
            while True:
                alive = thread.is_alive()
                events = ray.get(hub.take_all.remote())
                progress.update(events)
                tracker.handle(events)
                if not alive:
                    break
                time.sleep(0.5)  # each poll is a call to the hub: CPU the ranks do not get
        if failure:
            folders.record_state(output_dir, "failed")
            tracker.finish({"state": "failed"})
            raise _training_failed(recipe, failure[0]) from failure[0]
    finally:
        session.shutdown(embedded=address is None)
    outcome = console.outcome
    if outcome is not None and outcome.preflight:
        (output_dir / "preflight.json").write_text(json.dumps(outcome.preflight, indent=2))
    folders.record_state(output_dir, _final_state(outcome))
    if outcome is not None and outcome.state is RunState.PREFLIGHT_FAILED:
        raise PreflightError("preflight failed:\n" + "\n".join(f"  - {p}" for p in outcome.problems))
    summary = console.summary(output_dir, wall_time_s=time.time() - started)
    summary["startup_s"] = startup_breakdown(phases, output_dir / STARTUP_FILE)
    tracker.finish(summary)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return LaunchResult(output_dir=str(output_dir), summary=summary, outcome=outcome)


def startup_breakdown(driver_phases: dict[str, float], worker_file: Path) -> dict[str, float] | None:
    """Seconds spent in each phase from `tunefleet launch` to the end of the first step (of the last
    attempt): Ray start, job preparation (model folder, tokenization, planning), worker group start,
    preflight, model load, strategy setup (wrapping, sharding, compilation), first step."""
    if not worker_file.is_file():
        return None
    marks = {**driver_phases, **json.loads(worker_file.read_text())}
    order = ["launch", "ray_ready", "job_prepared", "worker_start", "preflight_done", "model_loaded",
             "strategy_ready", "first_step_done"]
    names = ["ray_start", "job_preparation", "worker_group_start", "preflight", "model_load", "strategy_setup",
             "first_step"]
    parts = {name: round(marks[b] - marks[a], 2) for name, a, b in zip(names, order[:-1], order[1:], strict=True)}
    return {**parts, "total": round(marks["first_step_done"] - marks["launch"], 2)}


# The run's state in `tunefleet runs` for each way the workers end.
RUN_STATES = {RunState.FINISHED: "finished", RunState.STOPPED_EARLY: "stopped early",
              RunState.PREEMPTED: "preempted", RunState.PREFLIGHT_FAILED: "failed"}


def _final_state(outcome: Outcome | None) -> str:
    """The run's state for `tunefleet runs`, from rank 0's outcome (None: the workers never finished)."""
    return "failed" if outcome is None else RUN_STATES[outcome.state]


def _exit_after_grace(recipe: Recipe, console: LaunchConsole) -> None:
    """Once a stop is requested, give workers the grace period, then leave regardless."""

    def expire() -> None:
        console.console.print(
            f"preemption grace of {recipe.fault_tolerance.preemption_grace_s:.0f}s ran out; exiting; "
            "the next launch resumes from the latest complete checkpoint"
        )
        os._exit(EXIT_PREEMPTED)

    console.console.print("stop requested: checkpointing, then exiting (Ctrl-C again to exit now)")
    timer = threading.Timer(recipe.fault_tolerance.preemption_grace_s, expire)
    timer.daemon = True
    timer.start()


def _training_failed(recipe: Recipe, exc: BaseException) -> TrainingFailed:
    resumable = checkpoint.latest(recipe.checkpoint_dir)
    hint = f"; `tunefleet launch` again resumes from {resumable}" if resumable else ""
    return TrainingFailed(
        f"training failed after {recipe.fault_tolerance.max_restarts} allowed restart(s): "
        f"{type(exc).__name__}: {root_cause(str(exc))}{hint} (Ray's full report: "
        f"{Path(recipe.output_dir) / LAUNCH_LOG}, or run with --verbose)"
    )


def root_cause(report: str) -> str:
    """The line of a (Ray) error report that names the exception the worker raised, instead of its traceback."""
    lines = [line.strip() for line in report.splitlines() if line.strip()]
    raised = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt|Exit)\b.*:", line)]
    return raised[-1] if raised else (lines[0] if lines else "")


def _resolved_yaml(recipe: Recipe, job: Job, reason: str) -> str:
    import yaml

    resolved = recipe.model_dump(mode="json")
    resolved["parallelism"]["strategy"] = job.strategy_plan.name
    header = (
        f"# Resolved by tunefleet: every default filled in, paths absolute.\n"
        f"# strategy: {job.strategy_plan.name} ({reason})\n# model files: {job.model_path}\n"
    )
    return header + yaml.safe_dump(resolved, sort_keys=False)
