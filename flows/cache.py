"""Stage results cached by content, persisted as small JSON records, verified when reused.

A stage's key comes from its declaration (`flows/stages.py`): the values it is called with, by
content, plus the code version and, for training, where it runs. The record stored under that key
holds the stage's artifact record and a manifest of every file it names (size and sha256 of each
file, every file of a directory). A hit is reused only if every file still matches its manifest: a
file changed, truncated, appended to or removed since is named in the log and the stage runs again
(its new output replaces the record). A run that failed at stage k, started again, finds stages
1..k-1 here and starts at stage k.

    runs/cache/<stage>/<key>.json   {"type": "ModelArtifact", "record": {...}, "files": {...},
                                     "mlflow_run_id": "..."}
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from flows.stages import LOCATION_FIELDS, is_location
from tunegate import artifacts
from tunegate.artifacts import Artifact, sha256_file

log = logging.getLogger(__name__)


class StageCache:
    def __init__(self, root: Path, enabled: bool = True):
        self.root, self.enabled = Path(root), enabled

    def entry(self, stage: str, key: str) -> str | None:
        """Where this stage's result for this key is (or will be) stored; None when caching is off."""
        return str(self.root / stage / f"{key}.json") if self.enabled else None


def load(entry: str | None) -> tuple[Artifact, str | None] | None:
    """The stored record and the MLflow run that made it, if it is there and every file it names
    still matches its manifest; None otherwise (the stage then runs again)."""
    if entry is None or not Path(entry).exists():
        return None
    try:
        stored = json.loads(Path(entry).read_text(encoding="utf-8"))
        record = getattr(artifacts, stored["type"]).model_validate(stored["record"])
        manifest: dict[str, list] = stored["files"]
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return None  # unreadable or from an older record schema: recompute
    if (problem := manifest_problem(record, manifest)) is not None:
        log.warning("not reusing the cached result %s: %s; running the stage again", entry, problem)
        return None
    return record, stored.get("mlflow_run_id")


def store(entry: str | None, record: Any, mlflow_run_id: str | None) -> None:
    if entry is None or not isinstance(record, Artifact):
        return
    path = Path(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    payload = {
        "type": type(record).__name__,
        "record": record.model_dump(mode="json"),
        "files": manifest(record),
        "mlflow_run_id": mlflow_run_id,
    }
    tmp.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def manifest(record: Artifact) -> dict[str, list]:
    """Every file the record names (a directory: each file under it): path -> [size, sha256]."""
    return {str(f): [f.stat().st_size, sha256_file(f)] for f in _files(record)}


def manifest_problem(record: Artifact, recorded: dict[str, list]) -> str | None:
    """Why the record's files no longer match `recorded`, or None. Sizes first (cheap), then digests."""
    current = {str(f) for f in _files(record)}
    if missing := sorted(set(recorded) - current):
        return f"{missing[0]} is missing"
    if added := sorted(current - set(recorded)):
        return f"{added[0]} was added since the result was stored"
    for name, (size, _) in recorded.items():
        if (now := Path(name).stat().st_size) != size:
            return f"{name} changed size ({size} -> {now} bytes)"
    for name, (_, digest) in recorded.items():
        if sha256_file(name) != digest:
            return f"{name} does not match the sha256 recorded when it was written"
    return None


def _files(record: Artifact) -> list[Path]:
    out: set[Path] = set()
    for loc in locations(record):
        p = Path(loc)
        if p.is_dir():
            out.update(f for f in p.rglob("*") if f.is_file())
        elif p.exists():
            out.add(p)
    return sorted(out)


def locations(record: Artifact) -> list[str]:
    """The files and directories a record names."""
    found: list[str] = []

    def walk(v: Any, key: str | None = None) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                if k == "dropped" and is_location(k, x):
                    found.extend(x.values())
                else:
                    walk(x, k)
        elif isinstance(v, list):
            for x in v:
                walk(x, key)
        elif isinstance(v, str) and key in LOCATION_FIELDS and v != "-":
            found.append(v)

    walk(record.model_dump(mode="json"))
    return found
