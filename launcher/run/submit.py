"""`tunefleet submit/status/logs/cancel`: hand a recipe to a cluster scheduler.

The recipe is loaded, overridden and checked here exactly as `tunefleet
launch` would, so a mistake fails on the login node rather than after a wait
in the queue. The job itself runs `tunefleet launch` with the same recipe file
and `--set` overrides. Backends live in `tunefleet.cluster` and are chosen by
`--to`; a job is named `<backend>:<id>` (a bare number is a Slurm job).

Register with `app.command()(submit)`, `app.command()(status)`, ... in cli.py.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel, ValidationError

from tunefleet.launcher.config import KubernetesConfig, Recipe, SlurmConfig, load_recipe
from tunefleet.launcher.errors import Problem, RecipeError, UserError

# Per backend: the recipe section holding its settings, and the command-line
# flags that override keys of that section.
SECTIONS: dict[str, type[BaseModel]] = {"slurm": SlurmConfig, "kubernetes": KubernetesConfig}
FLAGS: dict[str, tuple[str, ...]] = {"slurm": ("partition", "time", "account"), "kubernetes": ("namespace", "image")}

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe key, e.g. --set train.lr=1e-4 (repeatable; passed to the job)."),
]
JobArg = Annotated[str, typer.Argument(help="Job id as printed by submit: slurm:<id>, or a bare Slurm job number.",
                                       show_default=False)]


@contextmanager
def _as_user_errors() -> Iterator[None]:
    from tunefleet.cluster.backend import ClusterError

    try:
        yield
    except ClusterError as exc:
        raise UserError(str(exc)) from None


def backend_options(recipe: Recipe, to: str, flags: dict[str, Any]) -> BaseModel:
    """The recipe's `cluster.<to>` section with the command-line flags laid over it, validated."""
    given = {key: value for key, value in flags.items() if value is not None}
    for key in given:
        if key not in FLAGS[to]:
            raise UserError(f"--{key} does not apply to --to {to}")
    section = getattr(recipe.cluster, to, None)
    try:
        return SECTIONS[to].model_validate({**(section.model_dump() if section else {}), **given})
    except ValidationError as exc:
        problems = [Problem(f"--{err['loc'][0]}" if err["loc"] and err["loc"][0] in given else
                            f"cluster.{to}.{'.'.join(map(str, err['loc']))}", err["msg"].removeprefix("Value error, "))
                    for err in exc.errors()]
        raise RecipeError("command line", problems) from None


def submit(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)],
    to: Annotated[str, typer.Option("--to", help="Where to run: slurm or kubernetes.", show_default=False)],
    overrides: SetOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the job script instead of submitting.")] = False,
    partition: Annotated[str | None, typer.Option(help="Slurm partition (overrides cluster.slurm.partition).")] = None,
    time: Annotated[str | None, typer.Option(help="Slurm time limit, e.g. 2:00:00 (cluster.slurm.time).")] = None,
    account: Annotated[str | None, typer.Option(help="Slurm account (overrides cluster.slurm.account).")] = None,
    namespace: Annotated[
        str | None, typer.Option(help="Kubernetes namespace (overrides cluster.kubernetes.namespace).")
    ] = None,
    image: Annotated[str | None, typer.Option(help="Container image (overrides cluster.kubernetes.image).")] = None,
) -> None:
    """Submit the recipe as a cluster job that starts Ray and runs `tunefleet launch`; print the job id."""
    from tunefleet.cluster.backend import BACKENDS, get_backend
    from tunefleet.launcher.run.driver import check_recipe

    if to not in BACKENDS:
        raise UserError(f"--to {to}: unknown; choose one of: {', '.join(sorted(BACKENDS))}")
    loaded = load_recipe(recipe, overrides or [])
    check_recipe(loaded, str(recipe))
    flags = {"partition": partition, "time": time, "account": account, "namespace": namespace, "image": image}
    options = backend_options(loaded, to, flags)
    with _as_user_errors():
        backend = get_backend(to)
        if dry_run:
            sys.stdout.write(backend.render(loaded, str(recipe), overrides or [], options))
            return
        job_id = backend.submit(loaded, str(recipe), overrides or [], options)
    typer.echo(f"{to}:{job_id}")
    typer.echo(f"submitted; follow it with: tunefleet logs {to}:{job_id} --follow", err=True)


def status(job: JobArg) -> None:
    """Show a submitted job: state, reason, exit code, nodes, restarts and log file."""
    from tunefleet.cluster.backend import get_backend, parse_job_ref

    with _as_user_errors():
        name, job_id = parse_job_ref(job)
        typer.echo("\n".join(get_backend(name).status(job_id).lines()))


def logs(
    job: JobArg,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the job has finished.")] = False,
) -> None:
    """Print a submitted job's log (requeued runs append to the same log)."""
    from tunefleet.cluster.backend import get_backend, parse_job_ref

    with _as_user_errors():
        name, job_id = parse_job_ref(job)
        for chunk in get_backend(name).logs(job_id, follow):
            sys.stdout.write(chunk)
            sys.stdout.flush()


def cancel(job: JobArg) -> None:
    """Cancel a submitted job (pending or running)."""
    from tunefleet.cluster.backend import get_backend, parse_job_ref

    with _as_user_errors():
        name, job_id = parse_job_ref(job)
        before = get_backend(name).cancel(job_id)
    if before.finished:
        typer.echo(f"{before.job_id} had already finished ({before.state}); nothing to cancel")
    else:
        typer.echo(f"cancelled {before.job_id} (was {before.state})")
