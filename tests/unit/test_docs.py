"""The documentation site builds with warnings as errors, and its examples run.

Examples are the fenced ```console and ```python blocks of every page under docs/ (```bash and ```text blocks
are illustrations and are not run). In a console block each `$ ` line is a command, run with bash from a scratch
folder holding a copy of `recipes/`; the lines below it are output that must appear (whitespace-insensitive,
`...` skips). A python block runs as a script there and must exit 0 (its asserts are the check).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
RUN_LANGUAGES = ("console", "python")
COMMAND_TIMEOUT_S = 300

pytestmark = pytest.mark.slow  # the build plans a few large models; the examples start the CLI ~20 times


@dataclass
class Command:
    text: str
    expected: list[str] = field(default_factory=list)


@dataclass
class Example:
    page: str
    line: int
    language: str
    body: list[str]

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"

    def commands(self) -> list[Command]:
        commands: list[Command] = []
        for text in self.body:
            if text.startswith("$ "):
                commands.append(Command(text[2:]))
            elif text.strip() and text.strip() != "...":
                assert commands, f"{self.id}: output line before any `$ ` command: {text!r}"
                commands[-1].expected.append(text)
        return commands


def doc_examples() -> list[Example]:
    examples = []
    for path in sorted(DOCS.rglob("*.md")):
        lines = path.read_text().splitlines()
        start = language = None
        for number, line in enumerate(lines, 1):
            fence = line.strip()
            if start is None and fence.startswith("```"):
                start, language = number, fence.strip("`{} ").split(" ")[0].lstrip(".")
            elif start is not None and fence == "```":
                if language in RUN_LANGUAGES:
                    examples.append(Example(str(path.relative_to(DOCS)), start, language, lines[start:number - 1]))
                start = language = None
    return examples


def _squash(text: str) -> str:
    return " ".join(text.split())


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["COLUMNS"] = "200"  # rich tables on one line each, as on a wide terminal
    env.setdefault("TUNEFLEET_CACHE", str(ROOT / ".cache" / "tunefleet"))
    env.setdefault("WANDB_SILENT", "true")
    return env


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """A folder to run examples from: like the repository root, with a copy of the shipped recipes."""
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    return tmp_path


def _require_mkdocs() -> None:
    missing = [name for name in ("mkdocs", "material") if importlib.util.find_spec(name) is None]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not installed: run `make docs` (or pip install -e '.[docs]') "
                    "to install the documentation tools")


def test_site_builds_strictly_with_generated_pages(tmp_path: Path):
    _require_mkdocs()
    site = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                            cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr[-6000:]}"

    from tunefleet.launcher.config import Recipe
    from tunefleet.launcher.config.catalogue import recipe_name, shipped_recipes

    reference = (site / "reference" / "recipe.html").read_text()
    for key in _section_keys(Recipe):
        assert f'id="{key}"' in reference, f"recipe reference lacks the section {key}"
    catalogue = (site / "reference" / "catalogue.html").read_text()
    for path in shipped_recipes():
        assert recipe_name(path) in catalogue, f"catalogue page lacks {recipe_name(path)}"
    cli = (site / "reference" / "cli.html").read_text()
    for command in ("launch", "plan", "validate", "export", "submit"):
        assert f'id="{command}"' in cli, f"command line page lacks `tunefleet {command}`"
    strategies = (site / "strategies.html").read_text()
    assert strategies.count("choice: ") >= 4, "strategies page lacks its generated planner tables"
    assert "<!-- generate:" not in "".join(p.read_text() for p in site.rglob("*.html")), "a marker was not replaced"


def _section_keys(model, prefix: str = "") -> list[str]:
    """Dotted keys of every section (nested model) of the recipe, as the reference's anchors."""
    import typing

    from pydantic import BaseModel

    keys = []
    for name, info in model.model_fields.items():
        candidates = [info.annotation, *typing.get_args(info.annotation)]
        candidates += [inner for arg in typing.get_args(info.annotation) for inner in typing.get_args(arg)]
        section = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if section is not None:
            key = f"{prefix}{info.alias or name}"
            keys += [key, *_section_keys(section, f"{key}.")]
    return keys


def test_docs_have_runnable_examples():
    examples = doc_examples()
    assert sum(e.language == "console" for e in examples) >= 5
    assert sum(e.language == "python" for e in examples) >= 1
    for example in examples:
        if example.language == "console":
            assert example.commands(), f"{example.id}: a console block without `$ ` commands"


@pytest.mark.parametrize("example", doc_examples(), ids=lambda e: e.id)
def test_doc_example_runs(example: Example, scratch: Path):
    env = _env()
    if example.language == "python":
        result = subprocess.run([sys.executable, "-c", "\n".join(example.body)], cwd=scratch, env=env,
                                capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
        assert result.returncode == 0, f"{example.id}: python example failed:\n{result.stderr[-3000:]}"
        return
    for command in example.commands():
        result = subprocess.run(["bash", "-c", f"set -o pipefail; {command.text}"], cwd=scratch, env=env,
                                capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"{example.id}: `{command.text}` exited {result.returncode}:\n{output[-3000:]}"
        for line in command.expected:
            assert _squash(line) in _squash(output), (
                f"{example.id}: `{command.text}` did not print\n  {line}\nit printed:\n{output[-3000:]}"
            )
