"""A shared artifact root between the machine that runs the pipeline and the GPU workers.

Any fsspec URI: a local or mounted path, `s3://bucket/prefix` (needs `s3fs`), `gs://bucket/prefix`
(needs `gcsfs`). Files and model directories are stored by content, under their digest:

    <root>/data/<sha256>/<file name>         a built dataset split or manifest
    <root>/models/<digest>/...               a model directory (its digest: `sha256_dir`)
    <root>/models/<digest>/.complete         written last: an upload without it is not there

Object stores have no atomic rename, so the `.complete` marker is what makes an upload count; an
interrupted upload is simply done again. A fetch lands in a local cache keyed by the same digest,
checks the digest, and renames into place: a corrupted or tampered copy is an error naming the URI,
never a model that silently differs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from tunegate.artifacts import (
    DIGEST_FILE,
    DataFile,
    InstructionDataset,
    ModelArtifact,
    base_of,
    sha256_dir,
    sha256_file,
)
from tunegate.errors import ConfigError, TunegateError

COMPLETE = ".complete"


class ArtifactStoreError(TunegateError):
    """An artifact is missing from the shared root, or its content is not what its digest says."""


class ArtifactStore:
    def __init__(self, root: str) -> None:
        import fsspec

        try:
            self.fs, path = fsspec.core.url_to_fs(root)
        except (ImportError, ValueError) as exc:  # s3:// without s3fs, an unknown protocol
            raise ConfigError(
                [f"run.artifact_root {root!r}: {exc} (s3:// needs `pip install s3fs`, gs:// `gcsfs`)"]
            ) from exc
        self.root = path.rstrip("/")
        self.uri_root = root.rstrip("/")

    def __repr__(self) -> str:
        return f"ArtifactStore({self.uri_root!r})"

    # --- where things go ------------------------------------------------------------------------

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def uri(self, path: str) -> str:
        """The URI a worker elsewhere opens: the root as configured, plus the path below it."""
        return self.uri_root + path[len(self.root) :]

    def _from_uri(self, uri: str) -> str:
        if not uri.startswith(self.uri_root + "/"):
            raise ArtifactStoreError(f"{uri} is not under the artifact root {self.uri_root}")
        return self.root + uri[len(self.uri_root) :]

    def has(self, path: str) -> bool:
        return self.fs.exists(f"{path}/{COMPLETE}")

    # --- files and directories by content -------------------------------------------------------

    def put_file(self, local: str | Path, sha256: str | None = None) -> str:
        """Upload a file under its digest unless it is there already; return its URI."""
        local = Path(local)
        sha256 = sha256 or sha256_file(local)
        folder = self._path("data", sha256)
        target = f"{folder}/{local.name}"
        if not (self.has(folder) and self.fs.exists(target)):
            self.fs.makedirs(folder, exist_ok=True)
            self.fs.put_file(str(local), target)
            self._mark(folder)
        return self.uri(target)

    def put_dir(self, local: str | Path, digest: str) -> str:
        """Upload a model directory under its digest unless it is there already; return its URI."""
        local = Path(local)
        folder = self._path("models", digest)
        if not self.has(folder):
            for f in sorted(p for p in local.rglob("*") if p.is_file() and p.name != DIGEST_FILE):
                target = f"{folder}/{f.relative_to(local).as_posix()}"
                self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
                self.fs.put_file(str(f), target)
            self._mark(folder)
        return self.uri(folder)

    def get_file(self, uri: str, sha256: str, cache: Path) -> Path:
        """The file at `uri` in the local cache, its digest checked."""
        path = self._from_uri(uri)
        local = cache / "data" / sha256 / path.rsplit("/", 1)[1]
        if local.is_file() and sha256_file(local) == sha256:
            return local
        if not self.has(path.rsplit("/", 1)[0]):
            raise ArtifactStoreError(f"{uri} is not in the artifact root (no {COMPLETE} marker beside it)")
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex}.partial")
        try:
            self.fs.get_file(path, str(tmp))
            if (got := sha256_file(tmp)) != sha256:
                raise ArtifactStoreError(
                    f"{uri}: content digest {got[:16]} is not the recorded {sha256[:16]}; the stored copy "
                    "is corrupted: delete its folder in the artifact root and run again to upload it anew"
                )
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)
        return local

    def get_dir(self, uri: str, digest: str, cache: Path) -> Path:
        """The model directory at `uri` in the local cache (`<cache>/models/<digest>`), its digest checked."""
        path = self._from_uri(uri)
        local = cache / "models" / digest
        if local.is_dir():  # renamed into place only once its digest was checked
            return local
        if not self.has(path):
            raise ArtifactStoreError(f"{uri} is not in the artifact root (no {COMPLETE} marker)")
        tmp = local.with_name(f".{digest}.{uuid.uuid4().hex}.partial")
        try:
            for remote in sorted(self.fs.find(path)):
                rel = remote[len(path) + 1 :]
                if rel == COMPLETE:
                    continue
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(remote, str(tmp / rel))
            if (got := sha256_dir(tmp)) != digest:
                raise ArtifactStoreError(
                    f"{uri}: content digest {got[:16]} is not the recorded {digest[:16]}; the stored copy "
                    "is corrupted: delete that folder in the artifact root and run again to upload it anew"
                )
            with contextlib.suppress(OSError):  # another fetch of the same digest won: same content
                os.replace(tmp, local)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return local

    def _mark(self, folder: str) -> None:
        self.fs.pipe_file(f"{folder}/{COMPLETE}", b"")

    def put_json(self, name: str, payload: dict[str, Any]) -> str:
        path = self._path("results", name)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(path, json.dumps(payload).encode())
        return self.uri(path)

    def get_json(self, name: str) -> dict[str, Any] | None:
        path = self._path("results", name)
        if not self.fs.exists(path):
            return None
        return json.loads(self.fs.cat_file(path))

    def remove_json(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path("results", name))

    # --- records ----------------------------------------------------------------------------------

    def publish(self, record: Any) -> Any:
        """The record with its files uploaded and its paths replaced by URIs (None stays None)."""
        if record is None:
            return None
        if isinstance(record, ModelArtifact):
            for ref in _base_refs(Path(record.path)):  # an adapter's base goes along with it
                self.publish(ref)
            return record.model_copy(update={"path": self.put_dir(record.path, record.digest)})
        if isinstance(record, InstructionDataset):
            splits = {
                k: f.model_copy(update={"path": self.put_file(f.path, f.sha256)})
                for k, f in record.splits.items()
            }
            manifest = self.put_file(record.manifest)
            return record.model_copy(update={"splits": splits, "manifest": manifest, "root": self.uri_root})
        raise TypeError(f"cannot publish a {type(record).__name__}")

    def fetch(self, record: Any, cache: Path) -> Any:
        """The record with its files fetched into `cache` and its paths local again."""
        if record is None:
            return None
        if isinstance(record, ModelArtifact):
            local = self.get_dir(record.path, record.digest, cache)
            for ref in _base_refs(local):  # found beside it by digest (see tasks.training.base_of)
                self.fetch(ref.model_copy(update={"path": self.uri(self._path("models", ref.digest))}), cache)
            return record.model_copy(update={"path": str(local.resolve())})
        if isinstance(record, InstructionDataset):
            splits: dict[str, DataFile] = {
                k: f.model_copy(update={"path": str(self.get_file(f.path, f.sha256, cache).resolve())})
                for k, f in record.splits.items()
            }
            manifest_sha = self._from_uri(record.manifest).rsplit("/", 2)[1]
            manifest = self.get_file(record.manifest, manifest_sha, cache).resolve()
            return record.model_copy(
                update={"splits": splits, "manifest": str(manifest), "root": str(manifest.parent)}
            )
        raise TypeError(f"cannot fetch a {type(record).__name__}")


def _base_refs(model_dir: Path) -> list[ModelArtifact]:
    """The model an adapter directory was trained on, if it names one."""
    base = base_of(model_dir)
    return [base] if base is not None else []
