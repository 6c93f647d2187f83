"""Evaluation: what every evaluation during training computes, and `tunefleet eval`, which runs
the same code on an exported model or adapter.

The figures of one evaluation come from the objective (the token loss; a classifier's accuracy and
macro F1; a reward model's or DPO's pair accuracy and margin), plus greedy-generation matches with
``data.eval.generate`` and the reference perplexity with ``data.eval.reference_data``. Every figure
is reduced over ranks, so all ranks hold the same values.

`tunefleet eval` resolves its model folder and recipe on the driver, tokenizes the given file with
the recipe's data settings (as the run's eval split, through the same cache), and runs the
evaluation on a Ray Train worker group with the recipe's strategy and layout, as training does.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from tunefleet.launcher.config.recipe import (
    RESOLVED_RECIPE,
    Recipe,
    apply_overrides,
    eval_metrics,
    load_recipe,
    recipe_from_dict,
)
from tunefleet.launcher.data import batches
from tunefleet.launcher.errors import TrainingFailed, UserError
from tunefleet.launcher.evaluation import generation
from tunefleet.launcher.model import modeling
from tunefleet.launcher.objectives import dpo, reward
from tunefleet.launcher.objectives.sft import evaluate, evaluate_classifier, train_step
from tunefleet.strategies.base import Strategy, StrategyPlan


# ----------------------------------------------------------------------------- one evaluation, on every rank
def objective(recipe: Recipe, model_path: str, device: torch.device):
    """(step, evaluation) for the recipe: the token loss; the classifier loss with accuracy and macro F1;
    a reward model's pairwise loss with reward accuracy; or DPO against a frozen reference (LoRA: the
    policy with adapters disabled; full: a copy of the starting weights)."""
    if recipe.method.objective == "reward":
        return reward.reward_step, reward.reward_evaluate
    if recipe.model.task == "sequence_classification":
        labels = recipe.model.num_labels
        return train_step, lambda strategy, batches, device: evaluate_classifier(strategy, batches, device, labels)
    if recipe.method.objective != "dpo":
        return train_step, lambda strategy, batches, device: {"eval_loss": evaluate(strategy, batches, device)}
    reference, beta = dpo.load_reference(recipe, model_path, device), recipe.method.beta
    return (
        lambda strategy, batches, device: dpo.dpo_step(strategy, reference, batches, device, beta=beta),
        lambda strategy, batches, device: dpo.dpo_evaluate(strategy, reference, batches, device, beta=beta),
    )


@dataclass(frozen=True)
class EvalInputs:
    """This rank's share of the evaluation data, batched."""

    batches: list
    prompts: list | None  # greedy-generation prompts (data.eval.generate)
    reference: list | None  # forgetting-watch batches (data.eval.reference_data)


def open_eval_inputs(recipe: Recipe, data_dir: str, tokenizer, *, rank: int, world_size: int,
                     batch_size: int) -> EvalInputs | None:
    """Batches of the prepared eval (and reference) split; None when the data has no eval split."""
    eval_split = batches.open_split(Path(data_dir), "eval")
    if eval_split is None:
        return None
    pad_id, settings = tokenizer.pad_token_id, recipe.data.eval
    generate = settings.generate if settings is not None else None
    reference_split = batches.open_split(Path(data_dir), "reference")
    return EvalInputs(
        batches=batches.eval_batches(eval_split, rank=rank, world_size=world_size, batch_size=batch_size,
                                  max_rows=settings.max_rows if settings else None, pad_id=pad_id),
        prompts=(generation.rank_prompts(eval_split, tokenizer, max_prompts=generate.max_prompts, rank=rank,
                                         world_size=world_size) if generate is not None else None),
        reference=(batches.eval_batches(reference_split, rank=rank, world_size=world_size, batch_size=batch_size,
                                     max_rows=None, pad_id=pad_id) if reference_split is not None else None),
    )


def evaluate_all(strategy: Strategy, inputs: EvalInputs, evaluate_fn, recipe: Recipe, tokenizer, *,
                 batch_size: int, device: torch.device) -> dict[str, float]:
    """Collective: every figure of one evaluation, the same on every rank."""
    row = dict(evaluate_fn(strategy, inputs.batches, device))
    if inputs.prompts is not None:
        row |= generation.evaluate_generation(strategy, inputs.prompts, tokenizer, batch_size=batch_size,
                                              max_new_tokens=recipe.data.eval.generate.max_new_tokens,
                                              device=device)
    if inputs.reference is not None:
        row["reference_perplexity"] = math.exp(evaluate(strategy, inputs.reference, device))
    return row


# ----------------------------------------------------------------------------- `tunefleet eval` on the workers
@dataclass(frozen=True)
class EvalJob:
    """What the driver resolved for `tunefleet eval` (shipped to every worker)."""

    recipe: Recipe  # the run's recipe with the evaluated file as its data
    strategy_plan: StrategyPlan
    model_path: str  # the base model folder (tokenizer; adapters attach to it; DPO's reference)
    model_dir: str  # the exported model or adapter
    data_dir: str


def load_trained(recipe: Recipe, job: EvalJob, init_context) -> torch.nn.Module:
    """The exported weights in the module training builds: a full model folder loaded as the model, or
    the base with the recipe's adapter attached and its weights loaded from the adapter folder."""
    if recipe.method.kind == "full":
        return modeling.load_model(recipe.model, recipe.method, job.model_dir, init_context=init_context)
    import peft

    model = modeling.load_model(recipe.model, recipe.method, job.model_path, init_context=init_context)
    loaded = peft.set_peft_model_state_dict(model, peft.load_peft_weights(job.model_dir, device="cpu"))
    if loaded.unexpected_keys:
        raise UserError(f"{job.model_dir}: adapter weights {loaded.unexpected_keys[:3]} do not fit the recipe's "
                        f"method ({recipe.method.kind}); pass the --recipe the adapter was trained with")
    return model


def run_on_worker(job: EvalJob) -> dict[str, float]:
    """Collective: build the recipe's strategy around the exported model and evaluate it once."""
    from tunefleet.launcher.training.loop import seed_everything, worker_device
    from tunefleet.strategies import base as strategies

    recipe, plan = job.recipe, job.strategy_plan
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = worker_device(plan)
    seed_everything(recipe.train.seed)
    strategy = strategies.create(plan)
    tokenizer = modeling.load_tokenizer(job.model_path)
    module = load_trained(recipe, job, strategy.model_init_context())
    strategy.setup(module, modeling.make_optimizer_factory(recipe.train), modeling.make_scheduler_factory(recipe.train),
                   modeling.param_groups(module, recipe.train))
    inputs = open_eval_inputs(recipe, job.data_dir, tokenizer, rank=rank, world_size=world_size,
                              batch_size=plan.micro_batch_size)
    _, evaluate_fn = objective(recipe, job.model_path, device)
    row = evaluate_all(strategy, inputs, evaluate_fn, recipe, tokenizer, batch_size=plan.micro_batch_size,
                       device=device)
    strategy.teardown()
    return row


def eval_loop_per_worker(config: dict) -> None:
    """What Ray Train runs on every worker for `tunefleet eval`; rank 0 sends the figures back."""
    import ray.train

    from tunefleet.launcher.training import secrets
    from tunefleet.launcher.training.worker import _quiet_libraries

    secrets.install(config.get("secrets"))
    _quiet_libraries()
    row = run_on_worker(config["job"])
    if ray.train.get_context().get_world_rank() == 0:
        config["queue"].put({"event": "finish", "metrics": row})


# ----------------------------------------------------------------------------- `tunefleet eval` on the driver
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

    import ray
    from ray.util.queue import Queue

    from tunefleet.launcher.data import preprocess
    from tunefleet.launcher.run import driver, session

    target = resolve_target(path, recipe_file)
    recipe = eval_recipe(target, data_file, list(overrides))
    shown = check_metrics(recipe, metrics)
    check_model_kind(recipe, target.model_dir)
    address = session.cluster_address(recipe, address)
    plan, _ = driver.check_recipe(recipe, target.source, on_this_machine=address is None)
    session.connect(recipe, address)
    storage = Path(tempfile.mkdtemp(prefix="tunefleet-eval-"))
    try:
        model_path = modeling.resolve_model_path(recipe.model)
        data_dir = preprocess.prepare_on_ray(recipe.data, model_path, seed=recipe.train.seed)
        job = EvalJob(recipe=recipe, strategy_plan=plan, model_path=model_path, model_dir=str(target.model_dir),
                      data_dir=str(data_dir))
        queue = Queue(maxsize=100, actor_options={"num_cpus": 0, "scheduling_strategy": session.head_node_affinity()})
        trainer = session.worker_group(job, queue, None, loop=eval_loop_per_worker, name=f"{recipe.name}-eval",
                                       storage_path=str(storage), secret_store=session.secret_store())
        thread, failure = session.fit_in_background(trainer)
        thread.join()
        if failure:
            raise TrainingFailed(f"evaluation failed: {type(failure[0]).__name__}: {failure[0]}") from failure[0]
        events = queue.get_nowait_batch(queue.qsize()) if queue.qsize() else []
    finally:
        ray.shutdown()
        shutil.rmtree(storage, ignore_errors=True)
    row = next(event["metrics"] for event in events if event.get("event") == "finish")
    max_rows = recipe.data.eval.max_rows
    rows = batches.cache_meta(data_dir)["eval_rows"]
    return {"model": str(target.model_dir), "recipe": target.source, "data": str(data_file.absolute()),
            "eval_rows": min(rows, max_rows or rows), "strategy": plan.name, "world_size": plan.world_size,
            "metrics": {name: row[name] for name in shown}}


def write_report(report: dict, output: Path | None, console) -> None:
    """A table on the console, and the JSON report at ``output``."""
    from rich.table import Table

    console.print(f"[bold]{report['model']}[/] on {report['data']}: {report['eval_rows']} rows, "
                  f"{report['strategy']} on {report['world_size']} worker(s)", highlight=False, soft_wrap=True)
    table = Table("metric", "value", show_edge=False)
    table.columns[1].justify = "right"
    for name, value in report["metrics"].items():
        table.add_row(name, f"{value:.4f}")
    console.print(table)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"wrote {output}", highlight=False)

