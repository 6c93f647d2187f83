"""The three code folders install as tunefleet.* and nothing imports them bare."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import REPO

BARE_IMPORT = re.compile(r"^\s*(from|import)\s+(launcher|strategies|cluster)\b", re.MULTILINE)


def test_no_bare_imports_of_the_code_folders():
    offenders = []
    for folder in ("launcher", "strategies", "cluster", "tests", "benchmarks"):
        for path in (REPO / folder).rglob("*.py"):
            if BARE_IMPORT.search(path.read_text()):
                offenders.append(str(path.relative_to(REPO)))
    assert not offenders, f"import through tunefleet.: {offenders}"


def test_installed_under_tunefleet_namespace_only(tmp_path):
    """In a fresh interpreter outside the checkout, only tunefleet.* is importable."""
    probe = (
        "import importlib.util as u, tunefleet.launcher, tunefleet.strategies, tunefleet.cluster\n"
        "print(tunefleet.launcher.__file__)\n"
        "print([n for n in ('launcher', 'strategies', 'cluster') if u.find_spec(n)])"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    origin, leaked = result.stdout.splitlines()
    assert origin.startswith(str(REPO / "launcher"))
    assert leaked == "[]"


@pytest.mark.slow
def test_wheel_contains_only_tunefleet_packages(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(REPO)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("tunefleet-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top <= {"tunefleet", next(n for n in top if n.endswith(".dist-info"))}
    for module in ("launcher/cli.py", "strategies/ddp.py", "cluster/__init__.py"):
        assert f"tunefleet/{module}" in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt")))
    assert b"tunefleet = tunefleet.launcher.cli.app:main" in entry_points


COLLECTIVES = {"all_reduce", "all_gather", "broadcast", "barrier", "broadcast_object_list", "all_gather_object",
               "reduce", "gather", "scatter", "reduce_scatter", "all_to_all", "all_gather_into_tensor"}


def test_the_launcher_issues_collectives_only_through_its_collectives_module():
    """A collective on the default group fails for CPU tensors on GPU workers (NCCL has no CPU backend);
    launcher/collectives.py picks the group that serves each tensor's device, so every other module goes
    through it."""
    import ast

    offenders = []
    for path in (REPO / "launcher").rglob("*.py"):
        if path.name == "collectives.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "dist"):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} dist.{node.func.attr}")
    assert not offenders, f"use tunefleet.launcher.collectives instead: {offenders}"
