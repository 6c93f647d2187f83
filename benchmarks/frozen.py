"""Benchmarks run on a copy of the code taken when they start.

Other engineers edit the working tree while a benchmark runs for many minutes;
every run of one invocation must train with the same code, so the package and
the tiny recipes are copied once and put first on ``PYTHONPATH`` (the launched
``tunefleet`` CLI and its Ray workers import the copy).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def freeze_code(work: Path, ref: str | None = None) -> tuple[Path, str]:
    """Copy ``launcher``, ``strategies``, ``cluster`` and ``recipes/tiny`` under ``work``: from the
    working tree, or from the git commit ``ref`` (when the tree is mid-edit and does not run).

    Returns the copied ``recipes/tiny`` folder and a digest of the copied code.
    """
    root = work / "code"
    folders = ("launcher", "strategies", "cluster", "recipes/tiny")
    if ref is None:
        for name in folders:
            target = root / ("tunefleet/" + name if name != "recipes/tiny" else name)
            shutil.copytree(REPO / name, target, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        archive = subprocess.run(["git", "archive", ref, *folders], cwd=REPO, capture_output=True, check=True)
        (root / "tunefleet").mkdir(parents=True)
        subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)
        for name in folders[:3]:
            (root / name).rename(root / "tunefleet" / name)
    (root / "tunefleet" / "__init__.py").write_text("")
    sys.path.insert(0, str(root))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    digest = hashlib.sha256()
    for path in sorted((root / "tunefleet").rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return root / "recipes" / "tiny", digest.hexdigest()[:16]


def provenance(code_digest: str, ref: str | None = None) -> dict:
    """Commit, uncommitted code files (when run on the working tree) and digest of the frozen copy."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout

    if ref is not None:
        return {"git_commit": git("rev-parse", ref).strip(), "code": f"git commit {ref}", "code_digest": code_digest}
    return {"git_commit": git("rev-parse", "HEAD").strip(), "code": "working tree", "code_digest": code_digest,
            "uncommitted_code_files": git("status", "--porcelain", "launcher", "strategies").splitlines()}


def load_avg() -> list[float]:
    """1, 5 and 15 minute load averages (what `uptime` shows)."""
    return [round(x, 2) for x in os.getloadavg()]
