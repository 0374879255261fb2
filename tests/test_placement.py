"""`run.placement: pools` without a server: the shared artifact root (a local directory, and fsspec's
in-memory filesystem standing in for s3:// and gs://, which cannot be reached here), a training stage
as the GPU worker runs it, and how the pipeline side reads its outcome. The whole path through a
real Prefect server and a second worker is in tests/test_deployments.py."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest
import torch

from flows.placement import WorkerLost, run_stage
from flows.retries import is_transient
from tasks.model_io import load_causal_lm
from tests.conftest import tiny_raw_config
from tunegate.artifact_store import COMPLETE, ArtifactStore, ArtifactStoreError
from tunegate.artifacts import BASE_REF, ModelArtifact, base_of, sha256_dir
from tunegate.config import parse_config
from tunegate.errors import ConfigError, StageGateFailed, from_outcome


def _model(path: Path, role: str = "base") -> ModelArtifact:
    return ModelArtifact(path=str(path), role=role, base_model="tiny", digest=sha256_dir(path))


@pytest.fixture
def base(stage_inputs, tmp_path) -> ModelArtifact:
    copy = tmp_path / "machine-a" / "base"
    shutil.copytree(stage_inputs[1].path, copy)
    return _model(copy)


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path) -> ArtifactStore:
    if request.param == "local":
        yield ArtifactStore(str(tmp_path / "shared"))
        return
    # fsspec's in-memory filesystem stands in for an object store (s3://, gs://): no bucket here
    root = f"memory://tunegate-test-{uuid.uuid4().hex[:8]}/artifacts"
    yield ArtifactStore(root)
    import fsspec

    fsspec.filesystem("memory").rm(root.removeprefix("memory://").split("/")[0], recursive=True)


def test_dataset_and_model_round_trip_through_the_root_by_content(store, stage_inputs, base, tmp_path):
    dataset = stage_inputs[2]
    published = store.publish(dataset)
    model = store.publish(base)
    assert model.path.startswith(store.uri_root + "/models/" + base.digest)
    for name, f in published.splits.items():
        assert f.path.startswith(f"{store.uri_root}/data/{f.sha256}/"), name
        assert store.fs.exists(store._from_uri(f.path).rsplit("/", 1)[0] + f"/{COMPLETE}")

    fetched = store.fetch(published, tmp_path / "machine-b")
    for name, f in fetched.splits.items():
        assert Path(f.path).read_bytes() == Path(dataset.splits[name].path).read_bytes(), name
        assert f.sha256 == dataset.splits[name].sha256
    assert Path(fetched.manifest).read_bytes() == Path(dataset.manifest).read_bytes()
    local = store.fetch(model, tmp_path / "machine-b")
    assert local.path == str((tmp_path / "machine-b" / "models" / base.digest).resolve())
    assert sha256_dir(local.path) == base.digest and local.digest == base.digest

    # Published again: nothing is uploaded twice (the stored copy is not even touched).
    marker = f"{store._from_uri(model.path)}/{COMPLETE}"
    before = store.fs.info(marker)
    assert store.publish(base) == model
    assert store.fs.info(marker) == before


def test_an_upload_without_its_marker_does_not_count_and_is_done_again(store, base, tmp_path):
    folder = f"{store.root}/models/{base.digest}"
    store.fs.makedirs(folder, exist_ok=True)
    store.fs.pipe_file(f"{folder}/config.json", b"{")  # the upload died here
    uri = store.uri(folder)
    with pytest.raises(ArtifactStoreError, match="not in the artifact root"):
        store.fetch(base.model_copy(update={"path": uri}), tmp_path / "b")
    store.publish(base)
    assert sha256_dir(store.fetch(base.model_copy(update={"path": uri}), tmp_path / "b").path) == base.digest


def test_a_corrupted_stored_model_is_refused_naming_its_uri_and_nothing_is_cached(store, base, tmp_path):
    model = store.publish(base)
    stored = f"{store._from_uri(model.path)}/config.json"
    store.fs.pipe_file(stored, store.fs.cat_file(stored) + b" ")
    with pytest.raises(ArtifactStoreError, match=rf"{model.path}: content digest .* corrupted"):
        store.fetch(model, tmp_path / "b")
    assert not (tmp_path / "b" / "models" / base.digest).exists()
    assert not list((tmp_path / "b" / "models").iterdir())  # no partial copy left behind either


def test_an_adapter_travels_with_its_base_and_loads_on_a_machine_without_its_path(store, base, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter_dir = tmp_path / "machine-a" / "adapter"
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base.path),
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False),
    )
    peft_model.save_pretrained(adapter_dir)
    (adapter_dir / BASE_REF).write_text(json.dumps(base.model_dump(mode="json")))
    _, tokenizer = load_causal_lm(base.path)
    tokenizer.save_pretrained(adapter_dir)
    adapter = _model(adapter_dir, role="sft")
    ids = torch.tensor([[1, 5, 9, 13]])
    expected = load_causal_lm(adapter.path)[0](ids).logits

    published = store.publish(adapter)
    shutil.rmtree(tmp_path / "machine-a")  # machine B never had these paths
    local = store.fetch(published, tmp_path / "machine-b")
    found = base_of(local.path)
    assert found is not None and found.path == str(tmp_path / "machine-b" / "models" / base.digest)
    assert torch.allclose(load_causal_lm(local.path)[0](ids).logits, expected, atol=1e-5)


def test_a_training_stage_as_the_gpu_worker_runs_it_from_the_shared_root(stage_inputs, base, tmp_path):
    cfg, _, dataset, _ = stage_inputs
    store = ArtifactStore(str(tmp_path / "shared"))
    spec = {
        "args": [
            cfg.sft.model_dump(mode="json"),
            store.publish(dataset).model_dump(mode="json"),
            store.publish(base).model_dump(mode="json"),
        ],
        "seed": 1,
        "gpus": 1,
        "accelerate_config": None,
        "checkpoint_name": "sft-0123",
    }
    model = run_stage(store, "sft", spec, tmp_path / "worker")
    assert model.path.startswith(store.uri_root + "/models/") and model.role == "sft" and model.steps == 2
    local = store.fetch(model, tmp_path / "pipeline")
    assert sha256_dir(local.path) == model.digest
    assert not (tmp_path / "worker" / "checkpoints" / "sft-0123").exists()  # finished: cleaned up

    # A stage's own error comes back as its type: bad config is never retried as if transient.
    qlora = {
        **spec,
        "args": [cfg.sft.model_copy(update={"mode": "qlora"}).model_dump(mode="json"), *spec["args"][1:]],
    }
    with pytest.raises(ConfigError, match="qlora needs a CUDA GPU"):
        run_stage(store, "sft", qlora, tmp_path / "worker")


def test_the_pipeline_raises_the_stage_error_by_type_and_retries_only_a_lost_worker():
    assert isinstance(from_outcome({"error": "StageGateFailed", "message": "guard"}), StageGateFailed)
    config_error = from_outcome({"error": "ConfigError", "message": "x", "problems": ["sft.mode: no"]})
    assert isinstance(config_error, ConfigError) and "sft.mode: no" in str(config_error)
    assert is_transient(WorkerLost("sft: flow run crashed (worker lost or preempted)"))


def test_placement_pools_needs_a_reachable_artifact_root(tiny_model, data_dir, tmp_path):
    raw = tiny_raw_config(tiny_model, data_dir, tmp_path)
    raw["run"]["placement"] = "pools"
    with pytest.raises(ConfigError, match="run.placement=pools needs run.artifact_root"):
        parse_config(raw)
    with pytest.raises(ConfigError, match="run.artifact_root 'nosuch://bucket'.*s3fs"):
        ArtifactStore("nosuch://bucket")


def test_parallel_stages_split_the_cpu_here_and_run_as_flow_runs_on_pools(tiny_model, data_dir, tmp_path):
    """How a wave of two training stages runs: side by side with half the threads each on this CPU,
    as two flow runs (no thread limit) on pools, one after the other when the setting is off, and a
    single stage never goes through a child process."""
    from flows.pipeline import _side_by_side

    raw = tiny_raw_config(tiny_model, data_dir, tmp_path)
    off = parse_config(raw)
    on = parse_config({**raw, "run": {**raw["run"], "parallel_stages": True}})
    pools = parse_config(
        {**raw, "run": {**raw["run"], "parallel_stages": True, "placement": "pools", "artifact_root": "/s"}}
    )
    assert _side_by_side(off, 2) is None and _side_by_side(on, 1) is None
    assert _side_by_side(on, 2) == max(1, torch.get_num_threads() // 2)
    assert _side_by_side(pools, 2) == 0
