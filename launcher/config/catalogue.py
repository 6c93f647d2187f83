"""The recipe catalogue: the shipped recipes, what each trains on which cluster, and copying one to edit.

Recipes for real models sit in ``recipes/``, named ``<model>-<method>-<strategy>-<nodes>x<gpus>.yaml``
(strategy ``ddp``, ``fsdp``, ``zero2`` or ``zero3``); ``recipes/tiny/`` holds the CPU ones. A
catalogue recipe opens with a comment whose ``Cluster:`` line names its GPUs and whose ``Memory:``
line quotes the planner, e.g.::

    # Cluster: 1 node x 8 GPUs, 80 GiB each (A100/H100 80GB).
    # Memory: 24.2 GiB per GPU planned for fsdp (tunefleet plan recipes/...).

The listing reads those lines instead of planning every recipe (a few seconds each);
``tests/unit/test_catalogue.py`` proves them against the recipe body and the planner.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path

from tunefleet.launcher.config.base import TINY_PREFIX
from tunefleet.launcher.config.loading import read_yaml
from tunefleet.launcher.errors import UserError

TINY_DIR = "tiny"
STRATEGY_TAGS = {"ddp": "ddp", "fsdp": "fsdp", "zero2": "deepspeed_zero2", "zero3": "deepspeed_zero3"}
_NAME = re.compile(
    r"^(?P<model>.+)-(?P<method>full|lora|qlora|ia3|prefix_tuning|prompt_tuning)-"
    rf"(?P<strategy>{'|'.join(STRATEGY_TAGS)})-(?P<num_nodes>\d+)x(?P<gpus_per_node>\d+)$"
)
_CLUSTER = re.compile(r"^# Cluster: (\d+) nodes? x (\d+) GPUs?, (\d+(?:\.\d+)?) GiB each\b")
_MEMORY = re.compile(r"^# Memory: (\d+(?:\.\d+)?) GiB per GPU\b")
# Keys holding local paths that resolve against the recipe's folder (model.path only when written ./ or ../).
_PATH_KEYS = ("output_dir", "path", "dir", "cache_dir", "bin_dir")


def recipes_root() -> Path:
    """The shipped `recipes/` folder (the checkout this package was installed from)."""
    return Path(__file__).resolve().parents[2] / "recipes"


def shipped_recipes() -> list[Path]:
    """Every shipped recipe: the catalogue, then `tiny/`."""
    return sorted(recipes_root().rglob("*.yaml"))


def catalogue_recipes() -> list[Path]:
    """The recipes for real models and clusters (everything but `tiny/`)."""
    return sorted(recipes_root().glob("*.yaml"))


def recipe_name(path: Path) -> str:
    """How the catalogue names a recipe: its path under `recipes/` without `.yaml`."""
    return path.relative_to(recipes_root()).with_suffix("").as_posix()


@dataclass(frozen=True)
class NameParts:
    """What a catalogue file name says: `<model>-<method>-<strategy>-<nodes>x<gpus>`."""

    model: str
    method: str
    strategy: str
    num_nodes: int
    gpus_per_node: int


def parse_name(stem: str) -> NameParts | None:
    match = _NAME.match(stem)
    if match is None:
        return None
    return NameParts(model=match["model"], method=match["method"], strategy=STRATEGY_TAGS[match["strategy"]],
                     num_nodes=int(match["num_nodes"]), gpus_per_node=int(match["gpus_per_node"]))


@dataclass(frozen=True)
class Header:
    """The machine-read lines of a recipe's opening comment (None where absent)."""

    num_nodes: int | None = None
    gpus_per_node: int | None = None
    gpu_memory_gib: float | None = None
    planned_gib: float | None = None


def read_header(path: Path) -> Header:
    found: dict = {}
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if match := _CLUSTER.match(line):
            found.update(num_nodes=int(match[1]), gpus_per_node=int(match[2]), gpu_memory_gib=float(match[3]))
        elif match := _MEMORY.match(line):
            found["planned_gib"] = float(match[1])
    return Header(**found)


@dataclass(frozen=True)
class Entry:
    """One row of `tunefleet recipes`."""

    name: str
    model: str
    method: str
    strategy: str
    cluster: str
    memory: str


def entry(path: Path) -> Entry:
    """The catalogue row of ``path``, read from its YAML and header comment (no planning)."""
    raw = read_yaml(path)
    par, header = raw.get("parallelism") or {}, read_header(path)
    layout = f"{par.get('num_nodes', 1)}x{par.get('workers_per_node', 1)}"
    if par.get("use_gpu"):
        memory = f"{header.gpu_memory_gib or 80:g} GiB"
        cluster, planned = f"{layout} GPU, {memory}", header.planned_gib
    else:
        cluster, planned = f"{layout} CPU", None
    return Entry(
        name=recipe_name(path), model=str((raw.get("model") or {}).get("path")),
        method=str((raw.get("method") or {}).get("kind", "full")), strategy=str(par.get("strategy", "ddp")),
        cluster=cluster, memory=f"{planned:.1f} GiB" if planned is not None else "-",
    )


# --------------------------------------------------------------------------- init --from
def find(name: str) -> Path:
    """The shipped recipe called ``name`` (`llama-3.1-8b-lora-ddp-1x8`, `tiny/llama-full-ddp`, with or
    without `.yaml`; a tiny recipe also by its bare name); UserError listing close matches."""
    by_name = {recipe_name(path): path for path in shipped_recipes()}
    wanted = name.removesuffix(".yaml").removeprefix("recipes/")
    if wanted in by_name:
        return by_name[wanted]
    if f"{TINY_DIR}/{wanted}" in by_name:
        return by_name[f"{TINY_DIR}/{wanted}"]
    close = [known for known in by_name if wanted in known][:4] or difflib.get_close_matches(wanted, by_name, n=3,
                                                                                            cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "`tunefleet recipes` lists them"
    raise UserError(f"no shipped recipe named {name!r}; {hint}")


def copy_recipe(name: str, out: Path | None = None) -> Path:
    """Copy the shipped recipe ``name`` to ``out`` (default `./<name>.yaml`; a folder: into it), comments
    kept; relative paths are rewritten so that they still point where they did, except a relative
    output_dir, which becomes `runs/<copy's file stem>` beside the copy. Refuses to overwrite a file."""
    source = find(name)
    target = out or Path(source.name)
    if target.is_dir():
        target = target / source.name
    if target.exists():
        raise UserError(f"{target} already exists; pass another --out, or remove it first")
    if not target.parent.is_dir():
        raise UserError(f"--out {target}: folder {target.parent} does not exist; create it first")
    text = _rebase(source.read_text(), read_yaml(source), source.parent, target.stem)
    text = text.replace(f"recipes/{recipe_name(source)}.yaml", str(target))
    try:
        with target.open("x") as handle:
            handle.write(text)
    except FileExistsError:
        raise UserError(f"{target} already exists; pass another --out, or remove it first") from None
    return target


def _rebase(text: str, raw: dict, source_dir: Path, run_name: str) -> str:
    """``text`` with each relative local path made absolute against ``source_dir``, and a relative
    output_dir set to `runs/<run_name>`."""
    for key, value in _relative_paths(raw):
        new = f"runs/{run_name}" if key == "output_dir" else str((source_dir / value).resolve())
        line = re.compile(rf"^(\s*(?:-\s+)?{key}:\s*)(['\"]?){re.escape(value)}\2(?=\s*(?:#.*)?$)", re.MULTILINE)
        text = line.sub(lambda match, new=new: f"{match[1]}{new}", text, count=1)
    return text


def _relative_paths(raw: dict) -> list[tuple[str, str]]:
    """(key, value) of every relative local path in a raw recipe."""
    found = []

    def visit(node, key: str | None, section: str | None) -> None:
        if isinstance(node, dict):
            for child_key, child in node.items():
                visit(child, child_key, section or child_key)
        elif isinstance(node, list):
            for child in node:
                visit(child, None, section)
        elif isinstance(node, str) and key in _PATH_KEYS and _is_relative_local(node, model=section == "model"):
            found.append((key, node))

    visit(raw, None, None)
    return found


def _is_relative_local(value: str, *, model: bool) -> bool:
    if model:  # hub ids look relative; only ./ and ../ mark a folder
        return value.startswith(("./", "../"))
    return not (value.startswith(("/", "~", TINY_PREFIX)) or "://" in value)
