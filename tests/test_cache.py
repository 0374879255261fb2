"""Cache hits are verified against the manifest written with them; base-model digests are kept in
tunegate's own cache and not trusted on modification times."""

from __future__ import annotations

import logging
import os

from flows import cache
from tasks.base_model import model_digest
from tunegate.artifacts import DataFile, InstructionDataset, ModelArtifact, sha256_dir


def _dataset(tmp_path) -> InstructionDataset:
    root = tmp_path / "dataset"
    root.mkdir()
    (root / "sft_train.parquet").write_bytes(b"PAR1 rows PAR1")
    (root / "manifest.json").write_text("{}")
    split = DataFile(kind="sft", path=str(root / "sft_train.parquet"), rows=1, sha256="x")
    return InstructionDataset(
        root=str(root), splits={"sft_train": split}, manifest=str(root / "manifest.json")
    )


def test_a_hit_is_returned_only_while_its_files_match(tmp_path, caplog):
    record = _dataset(tmp_path)
    entry = str(tmp_path / "cache" / "build" / "k.json")
    cache.store(entry, record, "run-1")
    assert cache.load(entry) == (record, "run-1")

    train = tmp_path / "dataset" / "sft_train.parquet"
    with open(train, "ab") as f:  # one byte appended
        f.write(b"\0")
    with caplog.at_level(logging.WARNING, logger="flows.cache"):
        assert cache.load(entry) is None
    assert f"{train} changed size (14 -> 15 bytes)" in caplog.text

    train.write_bytes(b"PAR1 rowz PAR1")  # same size, other content
    assert cache.load(entry) is None
    train.write_bytes(b"PAR1 rows PAR1")  # restored: the hit is good again
    assert cache.load(entry) is not None

    (tmp_path / "dataset" / "extra.parquet").write_bytes(b"x")  # a file added under a recorded directory
    assert cache.load(entry) is None
    (tmp_path / "dataset" / "extra.parquet").unlink()
    (tmp_path / "dataset" / "manifest.json").unlink()
    with caplog.at_level(logging.WARNING, logger="flows.cache"):
        assert cache.load(entry) is None
    assert "manifest.json is missing" in caplog.text


def test_a_model_directory_is_verified_file_by_file(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights" * 100)
    (model / "config.json").write_text("{}")
    record = ModelArtifact(path=str(model), role="sft", base_model="m", digest=sha256_dir(model))
    entry = str(tmp_path / "c.json")
    cache.store(entry, record, None)
    assert cache.load(entry) is not None
    data = bytearray((model / "model.safetensors").read_bytes())
    data[3] ^= 1
    (model / "model.safetensors").write_bytes(bytes(data))
    assert cache.load(entry) is None


def test_a_record_without_a_manifest_is_recomputed(tmp_path):
    entry = tmp_path / "old.json"
    entry.write_text('{"type": "ModelArtifact", "record": {}, "mlflow_run_id": null}')
    assert cache.load(str(entry)) is None


def test_base_model_digest_lives_in_tunegates_cache_and_follows_the_files(tmp_path):
    model = tmp_path / "user-model"
    model.mkdir()
    weights = model / "model.safetensors"
    weights.write_bytes(b"a" * 64)
    digests = tmp_path / "digests"
    first = model_digest(model, digests)
    assert first == sha256_dir(model)
    assert sorted(p.name for p in model.iterdir()) == ["model.safetensors"]  # nothing written there
    assert len(list(digests.glob("*.json"))) == 1
    assert model_digest(model, digests) == first

    # Same size, and the modification time set back: the change time still gives it away.
    st = weights.stat()
    weights.write_bytes(b"b" * 64)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert model_digest(model, digests) == sha256_dir(model) != first
