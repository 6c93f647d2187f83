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
    # Every source module and data file of the three folders ships: a sub-package missing from
    # pyproject's explicit `packages` list would install a launcher that fails on import.
    expected = {f"tunefleet/{path.relative_to(REPO).as_posix()}"
                for folder in ("launcher", "strategies", "cluster") for path in (REPO / folder).rglob("*")
                if path.is_file() and "__pycache__" not in path.parts
                and (path.suffix == ".py" or path.parent.name in ("templates", "model_configs"))}
    assert len(expected) > 50
    assert sorted(expected - set(names)) == []
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


# --------------------------------------------------------------------------- the floors of the house
# Inside launcher/, sub-packages are floors; a module imports its own floor and the floors below it only.
FLOORS = ("cli", "run", "training", "evaluation", "objectives", "plan", "data", "model", "config")
LEVEL = {"cli": 0, "run": 1, "training": 2, "evaluation": 3, "objectives": 3, "plan": 4, "data": 5, "model": 6,
         "config": 7}
GROUND = {"tunefleet.launcher.errors", "tunefleet.launcher.collectives"}  # below every floor


def _module_name(path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["tunefleet", *parts])


def _resolve(module: str, name: str) -> str:
    """``from module import name``: the module imported, if ``name`` is a module itself."""
    candidate = f"{module}.{name}"
    path = REPO.joinpath(*candidate.split(".")[1:])
    return candidate if path.with_suffix(".py").is_file() or path.is_dir() else module


def import_graph() -> dict[str, list[tuple[str, int, str | None]]]:
    """Every tunefleet module -> [(imported tunefleet module, line, imported name)], read with ast (not executed),
    function-level (lazy) imports included; plus third-party top-level packages as ``ext:<name>``."""
    import ast

    graph = {}
    for folder in ("launcher", "strategies", "cluster"):
        for path in (REPO / folder).rglob("*.py"):
            edges = []
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    for alias in node.names:
                        if node.module.startswith("tunefleet"):
                            edges.append((_resolve(node.module, alias.name), node.lineno, alias.name))
                        else:
                            edges.append((f"ext:{node.module.split('.')[0]}", node.lineno, alias.name))
                elif isinstance(node, ast.Import):
                    for alias in node.names:
                        target = alias.name if alias.name.startswith("tunefleet") else f"ext:{alias.name.split('.')[0]}"
                        edges.append((target, node.lineno, None))
            graph[_module_name(path)] = edges
    return graph


def _floor(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "launcher" and parts[2] in LEVEL else None


def layering_violations(graph) -> list[str]:
    found = []
    for module, edges in graph.items():
        floor = _floor(module)
        for target, line, name in edges:
            where = f"{module}:{line} imports {target}"
            if name and name.startswith("_") and not name.startswith("__"):
                found.append(f"{where}.{name}: a private name of another module")
            if module.startswith("tunefleet.strategies") and (target == "ext:ray"
                                                             or target.startswith("tunefleet.launcher")):
                found.append(f"{where}: strategies/ knows nothing of Ray or the launcher")
            if module.startswith("tunefleet.cluster") and (target == "ext:torch" or (
                    target.startswith("tunefleet.launcher") and _floor(target) != "config"
                    and target not in GROUND)):
                found.append(f"{where}: cluster/ knows nothing of models, and of the launcher only the recipe")
            target_floor = _floor(target)
            if target_floor == "cli" and floor != "cli":
                found.append(f"{where}: nothing imports the command line")
            if floor and target_floor and LEVEL[target_floor] < LEVEL[floor]:
                found.append(f"{where}: {floor}/ may not import {target_floor}/ (a floor above it)")
            if floor in ("data", "config", "model", "plan", "objectives", "evaluation") and target == "ext:ray":
                found.append(f"{where}: {floor}/ runs without Ray")
            if floor == "config" and target.startswith("tunefleet") and _floor(target) != "config" \
                    and target != "tunefleet.launcher.errors":
                found.append(f"{where}: config/ imports nothing of tunefleet but errors")
            if module in GROUND and target.startswith("tunefleet") and target not in GROUND:
                found.append(f"{where}: the ground modules import no floor")
    return sorted(set(found))


def import_cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target, _, _ in graph[node]:
            if target not in graph:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return cycles


def private_attribute_uses() -> list[str]:
    """``module._name`` where ``module`` is an imported tunefleet module: a private name used across modules."""
    import ast

    found = []
    for folder in ("launcher", "strategies", "cluster"):
        for path in (REPO / folder).rglob("*.py"):
            tree = ast.parse(path.read_text())
            modules = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                       and node.module and node.module.startswith("tunefleet") for alias in node.names
                       if _resolve(node.module, alias.name) != node.module}
            for node in ast.walk(tree):
                if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                        and node.attr.startswith("_") and not node.attr.startswith("__")):
                    found.append(f"{_module_name(path)}:{node.lineno} {node.value.id}.{node.attr}")
    return found


def test_every_floor_imports_only_floors_below_it():
    assert set(LEVEL) == set(FLOORS)
    assert all((REPO / "launcher" / floor / "__init__.py").is_file() for floor in FLOORS)
    assert layering_violations(import_graph()) == []


def test_no_import_circles():
    assert import_cycles(import_graph()) == []


def test_no_private_name_crosses_a_module():
    assert private_attribute_uses() == []


def test_the_layering_check_catches_a_forbidden_import():
    """The checks above can fail: an upward import, a circle and a private import, planted in a copy of the graph."""
    graph = import_graph()
    planted = dict(graph)
    planted["tunefleet.launcher.data.batches"] = [*graph["tunefleet.launcher.data.batches"],
                                                  ("tunefleet.launcher.run.driver", 1, "launch"),
                                                  ("ext:ray", 2, None)]
    planted["tunefleet.launcher.model.inputs"] = [("tunefleet.launcher.model.tiny", 1, "_private_helper")]
    planted["tunefleet.launcher.model.tiny"] = [*graph["tunefleet.launcher.model.tiny"],
                                                ("tunefleet.launcher.model.inputs", 1, "IGNORE_INDEX")]
    planted["tunefleet.strategies.ddp"] = [*graph["tunefleet.strategies.ddp"], ("ext:ray", 3, None)]
    found = "\n".join(layering_violations(planted))
    assert "data/ may not import run/" in found and "data/ runs without Ray" in found
    assert "a private name of another module" in found and "strategies/ knows nothing of Ray" in found
    assert ["tunefleet.launcher.model.inputs", "tunefleet.launcher.model.tiny"] in import_cycles(planted)


def test_ray_trains_controller_opens_no_heavy_module():
    """Ray Train's controller unpickles the worker function and its config before any worker starts; neither may
    pull in torch or transformers there (3 s of CPU on the launch's critical path). The job travels as bytes
    that only a worker opens, and opens to the same job."""
    code = (
        "import pickle, sys\n"
        "import ray.cloudpickle as cp\n"
        "from tunefleet.launcher.training import worker\n"
        "fn = cp.loads(cp.dumps(worker.train_loop_per_worker))\n"
        "blob = cp.loads(cp.dumps({'job': sys.argv[1].encode()}))\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'tunefleet.launcher.training.loop') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code, "x"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_a_packed_job_opens_to_the_same_recipe(tmp_path):
    from tunefleet.launcher.config import load_recipe
    from tunefleet.launcher.training.worker import pack_job, unpack_job

    recipe = load_recipe(REPO / "recipes" / "tiny" / "llama-full-ddp.yaml", [f"output_dir={tmp_path}"])
    packed = pack_job(recipe)
    assert isinstance(packed, bytes)
    assert unpack_job(packed) == recipe
