"""MkDocs hook: pages whose content comes from the code, rendered at build time.

A page asks for generated content with a comment on a line of its own::

    <!-- generate: recipe-reference -->
    <!-- generate: catalogue -->
    <!-- generate: cli-reference -->
    <!-- generate: plan recipes/llama-3.1-8b-full-fsdp-1x8.yaml -->

and the hook replaces it with markdown built from the pydantic recipe schema,
the shipped recipes, the typer CLI or the memory planner. Nothing generated is
stored in `docs/`, so a new recipe field or command shows up in the next build.
"""

from __future__ import annotations

import json
import re
import types
import typing
import warnings
from functools import cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

ROOT = Path(__file__).resolve().parents[2]
_MARKER = re.compile(r"^<!-- generate: ([\w-]+)(?: (.+?))? -->$", re.MULTILINE)
_CONSTRAINTS = {"ge": "≥ {}", "gt": "> {}", "le": "≤ {}", "lt": "< {}", "min_length": "at least {} items",
                "max_length": "at most {} characters", "pattern": "matches `{}`"}
_HEADER_KEY = re.compile(r"^ (Cluster|Run|Memory):")
_SCALARS = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}


def on_page_markdown(markdown: str, page, config, files) -> str:
    def replace(match: re.Match) -> str:
        kind, argument = match[1], match[2]
        if kind not in GENERATORS:
            raise ValueError(f"{page.file.src_path}: unknown generator {kind!r}; known: {', '.join(GENERATORS)}")
        return GENERATORS[kind](argument) if argument else GENERATORS[kind]()

    return _MARKER.sub(replace, markdown)


# --------------------------------------------------------------------------- recipe reference
def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _sections_in(annotation: Any) -> list[tuple[type[BaseModel], bool]]:
    """(section model, is a list item) found in a field's annotation: `X`, `X | None`, `list[X]`."""
    if _is_section(annotation):
        return [(annotation, False)]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list and args and _is_section(args[0]):
        return [(args[0], True)]
    if origin in (typing.Union, types.UnionType):
        return [found for arg in args for found in _sections_in(arg)]
    return []


def _is_local_path(metadata: list[Any]) -> bool:
    from tunefleet.launcher.config import LocalPath

    resolver = typing.get_args(LocalPath)[1]
    return any(item == resolver for item in metadata)


def _type_text(annotation: Any, metadata: list[Any] = ()) -> str:
    if _is_local_path(list(metadata)):
        return "path"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_text(args[0], list(args[1:]))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_text(arg) for arg in args)
    if origin is Literal:
        return " or ".join(f"`{value}`" for value in args)
    if origin is list:
        return f"list of {_type_text(args[0])}"
    if origin is tuple:
        return f"[{', '.join(_type_text(arg) for arg in args)}]"
    if origin is dict:
        return f"mapping of {_type_text(args[0])} to {_type_text(args[1])}"
    if _is_section(annotation):
        return "section"
    return _SCALARS.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "**required**"
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return "see section"
    else:
        value = field.default
    return f"`{json.dumps(value)}`"


def _constraints(field: FieldInfo) -> list[str]:
    found = []
    for item in field.metadata:
        for attr, text in _CONSTRAINTS.items():
            value = getattr(item, attr, None)
            if value is not None:
                found.append(text.format(value))
    return found


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "&#124;") if "`" not in text else " ".join(text.split())


def _section_markdown(model: type[BaseModel], key: str, about: str, depth: int) -> list[str]:
    """The table of `model`'s fields, then (depth first) every nested section's own."""
    anchor = key or "top-level-keys"
    heading = "#" * min(depth, 6)
    lines = [f"{heading} `{key}` {{#{anchor}}}" if key else f"{heading} Top-level keys {{#{anchor}}}", ""]
    if about:
        lines += [about, ""]
    if model.__doc__ and key:
        lines += [" ".join(model.__doc__.split()), ""]
    lines += ["| key | type | default | description |", "|---|---|---|---|"]
    nested = []
    for name, field in model.model_fields.items():
        shown = field.alias or name
        path = f"{key}.{shown}" if key else shown
        sections = _sections_in(field.annotation)
        type_text = _type_text(field.annotation, field.metadata)
        if sections:
            section, is_list = sections[0]
            type_text = f"[{'list of sections' if is_list else type_text}](#{path})"
            if "null" in _type_text(field.annotation):
                type_text += " or null"
            nested.append((section, path, is_list, field.description or ""))
        description = field.description or ""
        if constraints := _constraints(field):
            description += f" *Constraint: {', '.join(constraints)}.*"
        lines.append(f"| `{shown}` | {_cell(type_text)} | {_default_text(field)} | {_cell(description)} |")
    lines.append("")
    for section, path, is_list, about in nested:
        about = f"{about} Each item of the list has these keys:" if is_list else about
        lines += _section_markdown(section, path, about.strip(), depth + 1 if key else depth)
    return lines


@cache
def recipe_reference() -> str:
    from tunefleet.launcher.config import Recipe

    return "\n".join(_section_markdown(Recipe, "", "", 2))


# --------------------------------------------------------------------------- catalogue
def _summary_line(path: Path) -> str:
    """The first sentence of the recipe's opening comment."""
    words = []
    for line in path.read_text().splitlines():
        text = line.removeprefix("#")
        if not line.startswith("#") or not text.strip() or text.startswith("   ") or _HEADER_KEY.match(text):
            break
        words.append(text.strip())
    first, _, _ = " ".join(words).partition(". ")
    return first.rstrip(".:") + "." if first else ""


@cache
def catalogue() -> str:
    from tunefleet.launcher.config.catalogue import entry, recipe_name, shipped_recipes

    lines = ["| recipe | model | method | strategy | cluster | memory/GPU | what |", "|---|---|---|---|---|---:|---|"]
    for path in shipped_recipes():
        row = entry(path)
        lines.append(f"| `{recipe_name(path)}` | `{row.model}` | {row.method} | {row.strategy} | {row.cluster} | "
                     f"{row.memory} | {_cell(_summary_line(path))} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- CLI reference
def _option_default(param) -> str:
    if param.required:
        return "**required**"
    if param.default is None or getattr(param, "is_flag", False) and param.default is False:
        return ""
    return f"`{param.default}`"


@cache
def cli_reference() -> str:
    import typer.main

    from tunefleet.launcher.cli.app import app

    group = typer.main.get_command(app)
    lines = []
    for name, command in group.commands.items():
        lines += [f"## `tunefleet {name}` {{#{name}}}", "", " ".join((command.help or "").split()), "",
                  "| argument or option | description | default |", "|---|---|---|"]
        for param in command.params:
            label = param.name.upper() if param.param_type_name == "argument" else " / ".join(param.opts)
            lines.append(f"| `{label}` | {_cell(getattr(param, 'help', None) or '')} | {_option_default(param)} |")
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- planner tables
def _gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.1f}"


@cache
def plan_table(recipe_path: str) -> str:
    from tunefleet.launcher.config import load_recipe
    from tunefleet.launcher.config.catalogue import read_header
    from tunefleet.launcher.plan.memory_fit import plan_report

    path = ROOT / recipe_path
    header = read_header(path)
    with warnings.catch_warnings():  # library deprecation notices while the meta model is built
        warnings.simplefilter("ignore")
        report = plan_report(load_recipe(path), gpus_per_node=header.gpus_per_node,
                             gpu_memory_gib=header.gpu_memory_gib)
    per = "device" if report.device == "gpu" else "worker"
    command = f"tunefleet plan {recipe_path}"
    if header.gpu_memory_gib is not None:
        command += f" --gpu-memory-gib {header.gpu_memory_gib:g}"
    lines = [
        f"`{command}`: {report.model_path} ({report.method}), {report.num_params / 1e9:.2f}B parameters, "
        f"{report.num_trainable_params / 1e6:.1f}M trainable; {report.num_nodes} node(s) x "
        f"{report.workers_per_node} {report.device} worker(s), {_gib(report.capacity_bytes)} GiB per {per}.",
        "",
        f"| strategy | params | grads | optimizer | activations | buffers | offloaded | total per {per} "
        "| host per worker | fits |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in report.rows:
        m = row.memory
        name = m.strategy + (" + cpu offload" if m.cpu_offload else "")
        parts = (m.params_bytes, m.grads_bytes, m.optimizer_bytes, m.activations_bytes, m.buffers_bytes,
                 m.offloaded_bytes, row.need_bytes, row.host_bytes)
        verdict = ("yes" if row.fits else "no") + (f" ({row.blocked})" if row.blocked else "")
        lines.append(f"| {name} | " + " | ".join(_gib(part) for part in parts) + f" | {_cell(verdict)} |")
    lines += ["", f"All figures in GiB. **choice: {report.choice or 'none'}** ({_cell(report.reason)})", ""]
    return "\n".join(lines)


GENERATORS = {
    "recipe-reference": recipe_reference,
    "catalogue": catalogue,
    "cli-reference": cli_reference,
    "plan": plan_table,
}
