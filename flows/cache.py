"""Stage results cached by content, persisted as small JSON records.

A stage's key is a digest of everything that decides its result: the stage, the code version
(`tunegate.provenance.code_version`), its config section, the seed, and the content digests of its
inputs (raw files, built splits, models), never their paths, which change from run to run. A hit
returns the stored artifact record only if every file or directory it names still exists; the stage
then does no work. A run that failed at stage k, started again, finds stages 1..k-1 here and starts
at stage k.

    runs/cache/<stage>/<key>.json   {"type": "ModelArtifact", "record": {...}, "mlflow_run_id": "..."}
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tunegate import artifacts
from tunegate.artifacts import Artifact

# Fields that name where a record's files are, not what they hold: left out of keys, checked on hits.
LOCATION_FIELDS = {
    "path",
    "root",
    "manifest",
    "report_json",
    "report_markdown",
    "samples_path",
    "per_row_path",
}


def content(value: Any) -> Any:
    """`value` as JSON-able data without locations: records keep their digests, counts and metrics."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", by_alias=True)
    if isinstance(value, dict):
        return {
            k: content(v)
            for k, v in value.items()
            if k not in LOCATION_FIELDS and not (k == "dropped" and _all_strings(v))
        }
    if isinstance(value, list | tuple):
        return [content(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _all_strings(v: Any) -> bool:
    return isinstance(v, dict) and bool(v) and all(isinstance(x, str) for x in v.values())


def locations(record: Artifact) -> list[str]:
    found: list[str] = []

    def walk(v: Any, key: str | None = None) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                if k == "dropped" and _all_strings(x):
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


class StageCache:
    def __init__(self, root: Path, code: str, enabled: bool = True):
        self.root, self.code, self.enabled = Path(root), code, enabled

    def key(self, stage: str, *parts: Any) -> str:
        payload = json.dumps([stage, self.code, *(content(p) for p in parts)], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:24]

    def entry(self, stage: str, *parts: Any) -> str | None:
        """Where this stage's result for these inputs is (or will be) stored; None when caching is off."""
        return str(self.root / stage / f"{self.key(stage, *parts)}.json") if self.enabled else None


def load(entry: str | None) -> tuple[Artifact, str | None] | None:
    """The stored record and the MLflow run that made it, if it is there and its files still exist."""
    if entry is None or not Path(entry).exists():
        return None
    try:
        stored = json.loads(Path(entry).read_text(encoding="utf-8"))
        record = getattr(artifacts, stored["type"]).model_validate(stored["record"])
    except (OSError, ValueError, KeyError, AttributeError):
        return None  # unreadable or from an older record schema: recompute
    if not all(Path(p).exists() for p in locations(record)):
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
        "mlflow_run_id": mlflow_run_id,
    }
    tmp.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def file_digests(paths: list[Path]) -> dict[str, str]:
    """sha256 of each file (a directory: of every file under it), by path."""
    from tunegate.artifacts import sha256_dir, sha256_file

    return {str(p): sha256_dir(p) if p.is_dir() else sha256_file(p) for p in paths}
