"""`tunefleet eval` on the driver: resolve the model folder and its recipe, check what was asked, tokenize the
given file with the recipe's data settings (as the run's eval split, through the same cache), and run one
evaluation on a Ray Train worker group with the recipe's strategy and layout, as training does. The workers
reuse the training loop's setup around the exported weights (``training.worker.eval_loop_per_worker``)."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tunefleet.launcher.config import (
    RESOLVED_RECIPE,
    Recipe,
    apply_overrides,
    eval_metrics,
    load_recipe,
    recipe_from_dict,
)
from tunefleet.launcher.data import batches
from tunefleet.launcher.errors import TrainingFailed, UserError
from tunefleet.launcher.model import modeling
from tunefleet.launcher.run import driver, session, tokenize_task
from tunefleet.launcher.training.job import EvalJob
from tunefleet.launcher.training.worker import eval_loop_per_worker


@dataclass(frozen=True)
class Target:
    model_dir: Path
    recipe: Recipe
    source: str  # where the recipe came from, for messages


def resolve_target(path: Path, recipe_file: Path | None) -> Target:
    """A run folder (its final/ and recorded recipe) or a model/adapter folder (with --recipe, or the
    recorded recipe of the run folder it sits in)."""
    if not path.exists():
        raise UserError(f"{path} not found; pass a run's output_dir or an exported model or adapter folder")
    if (path / RESOLVED_RECIPE).is_file():
        model_dir = path / "final"
        if not _is_model_dir(model_dir):
            raise UserError(f"{path} has no exported model in final/ (checkpoint.export_final was off or the run "
                            f"did not finish); export one with `tunefleet export {path} --out DIR` and evaluate DIR")
        run_dir = path
    elif _is_model_dir(path):
        model_dir, run_dir = path, path.parent
    else:
        raise UserError(f"{path} is neither a run folder (recipe.resolved.yaml) nor a model or adapter folder "
                        "(config.json or adapter_config.json)")
    if recipe_file is not None:
        recipe_source = recipe_file
    elif (run_dir / RESOLVED_RECIPE).is_file():
        recipe_source = run_dir / RESOLVED_RECIPE
    else:
        raise UserError(f"{path}: no recorded recipe next to it; pass --recipe, the recipe it was trained with")
    return Target(model_dir=model_dir, recipe=load_recipe(recipe_source), source=str(recipe_source))


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() or (path / "adapter_config.json").is_file()


def eval_recipe(target: Target, data_file: Path, overrides: list[str]) -> Recipe:
    """The run's recipe with ``data_file`` as its only data, read like its first source (format, fields,
    roles) and evaluated like its eval split (max_rows, generate, reference_data); training-only
    settings that need evaluations during training are dropped."""
    if not data_file.is_file() and not data_file.is_dir():
        raise UserError(f"--data {data_file}: file not found")
    raw = target.recipe.model_dump(mode="json")
    first = raw["data"]["sources"][0]
    raw["data"]["sources"] = [{"path": str(data_file.absolute()), "format": first["format"],
                               "fields": first["fields"], "roles": first["roles"]}]
    raw["data"]["eval"] = {**(raw["data"]["eval"] or {}), "path": str(data_file.absolute()), "fraction": None,
                           "early_stopping_patience": None}
    raw["checkpoint"] |= {"keep_best": False, "final_from": "last"}
    return recipe_from_dict(apply_overrides(raw, overrides), source=target.source)


def check_metrics(recipe: Recipe, wanted: list[str]) -> list[str]:
    """The figures to show: ``wanted``, each one the evaluation reports, or all of them."""
    produced = [name for name in eval_metrics(task=recipe.model.task, objective=recipe.method.objective,
                                              evaluation=recipe.data.eval)
                if name != "reference_perplexity_change"]  # needs the value before training
    unknown = [name for name in wanted if name not in produced]
    if unknown:
        raise UserError(f"--metric {unknown[0]}: not reported for this model and recipe; choose from "
                        f"{', '.join(produced)}")
    return wanted or produced


def check_model_kind(recipe: Recipe, model_dir: Path) -> None:
    is_adapter = (model_dir / "adapter_config.json").is_file()
    if is_adapter and recipe.method.kind == "full":
        raise UserError(f"{model_dir} holds a peft adapter but the recipe says method.kind full; pass the "
                        "--recipe the adapter was trained with")
    if not is_adapter and recipe.method.kind != "full":
        raise UserError(f"{model_dir} holds a full model but the recipe says method.kind {recipe.method.kind}; "
                        "use --set method.kind=full")


def run_eval(path: Path, data_file: Path, *, metrics: list[str], recipe_file: Path | None = None,
             overrides: list[str] = (), address: str | None = None) -> dict:
    """Evaluate the model at ``path`` on ``data_file`` on Ray workers; the report as a JSON-ready dict."""

    target = resolve_target(path, recipe_file)
    recipe = eval_recipe(target, data_file, list(overrides))
    shown = check_metrics(recipe, metrics)
    check_model_kind(recipe, target.model_dir)
    address = session.cluster_address(recipe, address)
    plan = driver.check_recipe(recipe, target.source, on_this_machine=address is None).strategy
    dashboard = session.connect(recipe, address)
    storage = Path(tempfile.mkdtemp(prefix="tunefleet-eval-"))
    try:
        model_path = modeling.resolve_model_path(recipe.model)
        data_dir = tokenize_task.prepare_on_ray(recipe.data, model_path, seed=recipe.train.seed)
        job = EvalJob(recipe=recipe, strategy_plan=plan, model_path=model_path, data_dir=str(data_dir),
                      wandb_run_id="", model_dir=str(target.model_dir))  # no tracker: the figures go to the console
        row = _evaluate_on_workers(job, storage, state_api=dashboard is not None, autoscaler=address is not None)
    finally:
        session.shutdown(embedded=address is None)
        shutil.rmtree(storage, ignore_errors=True)
    max_rows = recipe.data.eval.max_rows
    rows = batches.cache_meta(data_dir)["eval_rows"]
    return {"model": str(target.model_dir), "recipe": target.source, "data": str(data_file.absolute()),
            "eval_rows": min(rows, max_rows or rows), "strategy": plan.name, "world_size": plan.world_size,
            "metrics": {name: row[name] for name in shown}}


def _evaluate_on_workers(job: EvalJob, storage: Path, *, state_api: bool, autoscaler: bool) -> dict[str, float]:
    """With Ray up: run the evaluation worker group; rank 0's figures."""
    import ray

    hub = session.hub()
    trainer = session.worker_group(job, hub, loop=eval_loop_per_worker, name=f"{job.recipe.name}-eval",
                                   storage_path=str(storage), secret_store=session.secret_store(),
                                   state_api=state_api, autoscaler=autoscaler)
    thread, failure = session.fit_in_background(trainer)
    thread.join()
    if failure:
        raise TrainingFailed(f"evaluation failed: {type(failure[0]).__name__}: {failure[0]}") from failure[0]
    events = ray.get(hub.take_all.remote())
    return next(event["metrics"] for event in events if event.get("event") == "finish")
