"""Random mutations of valid recipes through the loader and `tunefleet validate`: every one is
either valid or one clear error (exit 0 or 2), never a traceback (exit 1).

The mutations start from the resolved tiny recipes (every default filled in, paths absolute):
deleted and renamed keys, values of the wrong type, huge numbers, then junk bytes, repeated
lines or a cut in the YAML text. Seeded (``derandomize``) and without a database, so a run is
repeatable and writes nothing into the checkout.
"""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from tests.conftest import REPO
from tunefleet.launcher.cli import app
from tunefleet.launcher.config import load_recipe
from tunefleet.launcher.errors import RecipeError

# Hypothesis caches what it learns under ./.hypothesis even without a database: keep it with the other caches.
set_hypothesis_home_dir(REPO / ".cache" / "hypothesis")
TINY_RECIPES = sorted((REPO / "recipes" / "tiny").glob("*.yaml"))
FUZZ = settings(max_examples=250, deadline=None, derandomize=True, database=None)

HUGE = st.sampled_from([10**30, -(10**30), 2**63, 2**64 + 1, 1e308, -1e308, float("inf"), float("nan"), -1, 0])
JUNK_VALUES = st.one_of(
    HUGE, st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=6), st.integers(), max_size=2),
)


@pytest.fixture(scope="module")
def resolved(tmp_path_factory) -> dict[str, dict]:
    """Each tiny recipe as its run records it, writing into a temporary output_dir."""
    out = tmp_path_factory.mktemp("fuzz-out")
    return {path.stem: {**load_recipe(path).model_dump(mode="json"), "output_dir": str(out / path.stem)}
            for path in TINY_RECIPES}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _paths(node, prefix=()) -> list[tuple]:
    """Every key (dict) and index (list) path in the recipe tree."""
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    found = []
    for key, child in children:
        found += [(*prefix, key), *_paths(child, (*prefix, key))]
    return found


def _parent(raw: dict, path: tuple):
    node = raw
    for part in path[:-1]:
        node = node[part]
    return node


def _near_miss(data, key: str) -> str:
    if not key:
        return "x"
    i = data.draw(st.integers(0, len(key) - 1))
    return data.draw(st.sampled_from([key[:i] + key[i + 1:], key[:i] + key[i] + key[i:],
                                      key[:i] + key[i + 1:i + 2] + key[i] + key[i + 2:]]))


def _mutate_tree(data, raw: dict) -> None:
    path = data.draw(st.sampled_from(_paths(raw)))
    parent = _parent(raw, path)
    op = data.draw(st.sampled_from(["delete", "rename", "retype"]))
    if op == "delete":
        del parent[path[-1]]
    elif op == "retype":
        parent[path[-1]] = data.draw(JUNK_VALUES)
    elif isinstance(parent, dict):
        new = data.draw(st.one_of(st.just(_near_miss(data, path[-1])), st.text(max_size=10)))
        parent[new] = parent.pop(path[-1])


def _mutate_text(data, text: bytes) -> bytes:
    op = data.draw(st.sampled_from(["none", "junk", "repeat_line", "cut"]))
    at = data.draw(st.integers(0, len(text)))
    if op == "junk":
        return text[:at] + data.draw(st.binary(min_size=1, max_size=8)) + text[at:]
    if op == "repeat_line":
        lines = text.splitlines(keepends=True)
        i = data.draw(st.integers(0, len(lines) - 1))
        return b"".join([*lines[:i + 1], lines[i], *lines[i + 1:]])
    return text[:at] if op == "cut" else text


def _mutated_recipe(data, resolved: dict[str, dict], folder: Path) -> Path:
    raw = yaml.safe_load(yaml.safe_dump(resolved[data.draw(st.sampled_from(sorted(resolved)))]))  # a deep copy
    for _ in range(data.draw(st.integers(1, 3))):
        if _paths(raw):
            _mutate_tree(data, raw)
    path = folder / "recipe.yaml"
    path.write_bytes(_mutate_text(data, yaml.safe_dump(raw, sort_keys=False).encode()))
    return path


@FUZZ
@given(data=st.data())
def test_loader_raises_only_recipe_errors(data, resolved, folder):
    path = _mutated_recipe(data, resolved, folder)
    try:
        load_recipe(path)
    except RecipeError as exc:
        assert exc.problems and all(problem.message for problem in exc.problems)


@FUZZ
@given(data=st.data())
def test_validate_exits_0_or_2(data, resolved, folder):
    path = _mutated_recipe(data, resolved, folder)
    with mock.patch.object(sys, "argv", ["tunefleet", "validate", str(path)]), pytest.raises(SystemExit) as exited:
        app.main()  # any other exception is a traceback for the user, and fails here
    assert exited.value.code in (0, 2)
