"""Reading a recipe: YAML (refusing a key written twice), `--set KEY=VALUE` overrides, and validation that
reports every problem at once, each with the key to change."""

from __future__ import annotations

import difflib
import os
import re
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tunefleet.launcher.config.base import TINY_PREFIX
from tunefleet.launcher.config.recipe import Recipe
from tunefleet.launcher.errors import Problem, RecipeError

# The recipe as a run used it (defaults filled in, paths absolute): written into every run folder by the
# driver, read back by `tunefleet export` and `tunefleet eval`.
RESOLVED_RECIPE = "recipe.resolved.yaml"


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (["train", "lr"], "1e-4"); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
        raise RecipeError("--set", [Problem(text, "expected KEY=VALUE with a dotted key, e.g. train.lr=1e-4")])
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise RecipeError("--set", [Problem(key, f"value is not valid YAML: {exc}")]) from None
    return key.split("."), value


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The section an annotation holds: `X`, `X | None` or `list[X]`; None for a plain value."""
    if typing.get_origin(annotation) is None and isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next(filter(None, map(_section_model, typing.get_args(annotation))), None)


def _section_at(keys: tuple | list) -> type[BaseModel] | None:
    """The section that dotted ``keys`` (a pydantic error location: names or aliases, list indices)
    point into; None where they leave the schema."""
    section: type[BaseModel] | None = Recipe
    for key in keys:
        if isinstance(key, int):
            continue
        if section is None:
            return None
        field = next((f for name, f in section.model_fields.items() if key in (name, f.alias)), None)
        if field is None:
            return None
        section = _section_model(field.annotation)
    return section


def _field_is_path(keys: list[str]) -> bool:
    section = _section_at(keys[:-1])
    return (section is not None and keys[-1] in section.model_fields
            and keys[-1] in ("output_dir", "path", "dir", "cache_dir", "reference_data"))


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        keys, value = parse_override(text)
        if isinstance(value, str) and _field_is_path(keys):
            value = str(Path(os.path.expanduser(value)).absolute()) if not value.startswith(TINY_PREFIX) else value
        node = raw
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            elif not isinstance(child, dict):
                raise RecipeError("--set", [Problem(".".join(keys), f"`{key}` is not a section")])
            node = child
        node[keys[-1]] = value
    return raw


def _unknown_key(loc: tuple) -> str:
    """The message for a key its section does not have, with the nearest real key when one is close."""
    section = _section_at(loc[:-1])
    keys = [field.alias or name for name, field in section.model_fields.items()] if section else []
    if close := difflib.get_close_matches(str(loc[-1]), keys, n=1):
        return f"unknown key; did you mean `{close[0]}`?"
    return "unknown key; check the spelling (`tunefleet schema` lists every key)"


def _problems_from(exc: ValidationError) -> list[Problem]:
    problems = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"]) or "(recipe)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = _unknown_key(err["loc"])
        elif err["type"] == "missing":
            msg = "required key is missing"
        key, _, rest = msg.partition(": ")
        if rest and key.startswith(f"{where}.") and " " not in key:  # a section's check names a deeper key
            where, msg = key, rest
        problems.append(Problem(where, msg))
    return problems


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader that also notes each key written twice in one mapping (which YAML
    loaders otherwise accept, the last one winning) as (key, first line, repeated line)."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self.duplicates: list[tuple[Any, int, int]] = []
        self._seen_mappings: set[yaml.MappingNode] = set()

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # Runs for every mapping, first with its keys as written, then again (once flattened) for each
        # merge (`<<: *anchor`) it is pulled into, where a key overriding a merged one is no duplicate.
        if node not in self._seen_mappings:
            self._seen_mappings.add(node)
            lines: dict[Any, int] = {}
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    key, line = self.construct_object(key_node), key_node.start_mark.line + 1
                    if key in lines:
                        self.duplicates.append((key, lines[key], line))
                    lines.setdefault(key, line)
        super().flatten_mapping(node)


def _parse_yaml(path: Path, text: str) -> Any:
    try:
        loader = _RecipeLoader(text)  # refuses unprintable characters (a NUL) already
        try:
            raw = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(str(path), [Problem(where, f"malformed YAML ({problem}); fix the syntax there")]) from None
    if loader.duplicates:
        raise RecipeError(str(path), [
            Problem(f"{path}:{again}", f"key `{key}` given twice, on lines {first} and {again}; keep one")
            for key, first, again in loader.duplicates
        ])
    return raw


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise RecipeError(str(path), [Problem(str(path), "is a folder; give the recipe's YAML file")])
    if not path.is_file():
        raise RecipeError(str(path), [Problem(str(path), "recipe file not found")])
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        found = f"byte 0x{exc.object[exc.start]:02x} at offset {exc.start}"
        raise RecipeError(str(path), [
            Problem(str(path), f"not a UTF-8 text file ({found}); save the recipe as UTF-8 YAML")]) from None
    raw = _parse_yaml(path, text)
    if not isinstance(raw, dict):
        raise RecipeError(str(path), [Problem(str(path), "a recipe must be a YAML mapping of sections")])
    return raw


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe; raise RecipeError with every problem."""
    path = Path(path)
    raw = apply_overrides(read_yaml(path), list(overrides))
    try:
        return Recipe.model_validate(raw, context={"base_dir": str(path.resolve().parent)})
    except ValidationError as exc:
        raise RecipeError(str(path), _problems_from(exc)) from None


def recipe_from_dict(raw: dict, source: str | None = None) -> Recipe:
    """Rebuild an already-resolved recipe (as shipped to workers); with ``source``, a recipe edited in code
    whose problems are reported as RecipeError from that file."""
    if source is None:
        return Recipe.model_validate(raw)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(source, _problems_from(exc)) from None
