"""Typed user errors. The CLI prints them without a traceback and exits 2."""

from __future__ import annotations

from dataclasses import dataclass


class UserError(Exception):
    """A mistake the user can fix; the message says what to change."""

    exit_code = 2


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a recipe: where (a dotted key or a file) and what to do."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


class RecipeError(UserError):
    """Every problem found in one recipe, reported together."""

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s)\n{lines}")


class DataError(UserError):
    """A data file, row or field that cannot be used."""


class PreflightError(UserError):
    """A worker environment check failed before training started."""


class TrainingFailed(Exception):
    """Workers failed more often than ``fault_tolerance.max_restarts`` allows."""

    exit_code = 1
