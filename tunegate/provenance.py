"""Where a run came from, beyond its data and config: the code's git commit and the library versions."""

from __future__ import annotations

import hashlib
import json
import subprocess
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

LIBRARIES = (
    "torch",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "datasets",
    "great_expectations",
    "lm_eval",
    "mlflow",
    "prefect",
)


def git_commit(where: str | Path | None = None) -> str:
    """The commit of the checkout tunegate runs from, with `+dirty` for uncommitted changes to tracked
    files; `unknown` outside a git checkout (an installed wheel)."""
    cwd = Path(where) if where else Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}+dirty" if dirty else head


def library_versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


@cache
def code_version() -> str:
    """A digest of the stage code (tasks/, data_checks/, tunegate/) and the training libraries'
    versions: what a cached stage result must have been made with to be reused."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256(json.dumps(library_versions(), sort_keys=True).encode())
    for package in ("tasks", "data_checks", "tunegate"):
        for f in sorted((root / package).rglob("*.py")):
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]
