"""Security: secrets never land in what a run writes, model code runs only when the config says so,
YAML cannot construct objects, data paths stay inside the worker's data roots, and credentials are
never part of a config."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from prefect.testing.utilities import prefect_test_harness

from flows.guards import check_data_roots
from flows.pipeline import pipeline
from tasks.base_model import prepare_base_model
from tasks.model_io import load_causal_lm
from tests.conftest import tiny_raw_config
from tunegate.config import load_config, parse_config
from tunegate.errors import ConfigError

# Whole pipeline runs, real servers or subprocess drills: not in `make test-fast`.
pytestmark = pytest.mark.integration

# Planted where a careless pipeline would pick them up: the environment and a Prefect Secret block.
PLANTED = {
    "HF_TOKEN": "hf_PlantedTokenValue0123456789abcdef",
    "AWS_SECRET_ACCESS_KEY": "PlantedAwsSecretKey/0123456789abcdefghij",
    "MLFLOW_TRACKING_PASSWORD": "planted-mlflow-password-5a1c",
}
BLOCK_SECRET = "planted-block-secret-value-9f3e7d"


@pytest.fixture(scope="module")
def prefect_db():
    """A temporary Prefect API; yields the directory of its database."""
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

    with prefect_test_harness(server_startup_timeout=120):
        url = PREFECT_SERVER_DATABASE_CONNECTION_URL.value()
        yield Path(url.split("///", 1)[1]).parent


def test_planted_secrets_appear_nowhere_the_run_wrote(
    prefect_db, tiny_model, data_dir, tmp_path, monkeypatch
):
    from prefect.blocks.system import Secret

    Secret(value=BLOCK_SECRET).save("tunegate-test-token", overwrite=True)
    for name, value in PLANTED.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TUNEGATE_PLANTED_FROM_BLOCK", raising=False)
    raw = tiny_raw_config(tiny_model, data_dir, tmp_path)
    raw["run"]["secrets"] = {"TUNEGATE_PLANTED_FROM_BLOCK": "tunegate-test-token"}
    result = pipeline(parse_config(raw))
    assert result["registration"]["promoted"]
    assert "TUNEGATE_PLANTED_FROM_BLOCK" not in os.environ  # set for the run only

    from mlflow import MlflowClient
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # the run's logs, as the Prefect UI shows them, are in its database
    client = MlflowClient(tracking_uri=raw["registry"]["tracking_uri"])
    tags = client.get_run(result["mlflow_run_id"]).data.tags
    assert tags["tunegate.secrets_from_blocks"] == "TUNEGATE_PLANTED_FROM_BLOCK"  # the name, not the value
    # lineage records that no model code was allowed to run, on the run and on the version
    version = client.get_model_version("tiny-assistant", result["registration"]["version"])
    assert tags["tunegate.trust_remote_code"] == version.tags["tunegate.trust_remote_code"] == "false"

    secrets = [*PLANTED.values(), BLOCK_SECRET]
    scanned = 0
    # Everything on disk: run outputs, checkpoints, caches, the MLflow store (database, artifacts,
    # params and tags inside it), and the Prefect database (flow run parameters, logs, artifacts).
    for root in (tmp_path, prefect_db):
        for f in (p for p in root.rglob("*") if p.is_file()):
            data = f.read_bytes()
            scanned += 1
            for secret in secrets:
                if f.parent == prefect_db and secret == BLOCK_SECRET:
                    continue  # the block itself lives in Prefect's database, encrypted; checked below
                assert secret.encode() not in data, f"{secret[:8]}... found in {f}"
    assert scanned > 50
    # The block's value is stored encrypted, never in clear text.
    prefect_files = [f.read_bytes() for f in prefect_db.glob("*") if f.is_file()]
    assert not any(BLOCK_SECRET.encode() in data for data in prefect_files)
    assert any(b"verdict: PASS" in data for data in prefect_files)  # the scan did reach the run's logs


def test_model_code_runs_only_when_the_config_turns_it_on(tiny_model, tmp_path, monkeypatch):
    """A model directory whose config asks for its own Python code, which writes a marker when run."""
    evil = tmp_path / "evil-model"
    shutil.copytree(tiny_model, evil)
    marker = tmp_path / "code-ran"
    (evil / "evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'llama'\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n"
    )
    config = json.loads((evil / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (evil / "config.json").write_text(json.dumps(config))

    assert parse_config({}).model.trust_remote_code is False
    # The permission travels with the model's record, never through the environment.
    monkeypatch.setenv("TUNEGATE_TRUST_REMOTE_CODE", "1")  # what older versions read
    section = parse_config({"model": {"base_model": str(evil), "cache_dir": str(tmp_path / "cache")}}).model
    base = prepare_base_model(section)
    assert base.trust_remote_code is False
    model, _ = load_causal_lm(base.path, trust_remote_code=base.trust_remote_code)
    assert type(model).__name__ == "LlamaForCausalLM" and not marker.exists()  # transformers' own class

    trusted = prepare_base_model(section.model_copy(update={"trust_remote_code": True}))
    assert trusted.trust_remote_code is True and trusted.digest == base.digest
    load_causal_lm(trusted.path, trust_remote_code=trusted.trust_remote_code)
    assert marker.read_text() == "ran"


def test_yaml_cannot_construct_objects(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f"run: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="evil.yaml"):
        load_config(path)
    with pytest.raises(ConfigError):
        load_config(None, [f"run.name=!!python/object/apply:os.system ['touch {marker}']"])
    assert not marker.exists()


def test_data_paths_cannot_leave_the_workers_data_roots(tiny_model, data_dir, tmp_path, monkeypatch):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    shutil.copy(data_dir / "sft.jsonl", allowed / "sft.jsonl")
    (allowed / "link.jsonl").symlink_to(data_dir / "sft.jsonl")  # a link out of the root
    outside = tmp_path / "outside"
    outside.mkdir()
    for kind in ("preferences", "prompts", "eval"):
        shutil.copy(data_dir / f"{kind}.jsonl", allowed / f"{kind}.jsonl")
    raw = tiny_raw_config(tiny_model, data_dir, tmp_path)
    raw["data"] = {k: str(allowed / f"{k}.jsonl") for k in ("sft", "preferences", "prompts", "eval")}
    monkeypatch.setenv("TUNEGATE_DATA_ROOTS", str(allowed))
    check_data_roots(parse_config(raw))  # inside: fine

    shutil.copy(data_dir / "sft.jsonl", outside / "sft.jsonl")
    for escape in (f"{allowed}/../outside/sft.jsonl", str(allowed / "link.jsonl")):
        raw["data"]["sft"] = escape
        with pytest.raises(ConfigError, match=r"data.sft: .* outside the data roots this worker allows"):
            check_data_roots(parse_config(raw))


def test_a_benchmark_task_definition_cannot_leave_the_workers_data_roots(
    tiny_model, data_dir, tmp_path, monkeypatch
):
    """A local lm-eval task may run code (`!function`) and reads data files: the data roots confine its
    directory and every file its YAMLs name, as they confine the run's data."""
    allowed = tmp_path / "allowed"
    task_dir = allowed / "mc"
    task_dir.mkdir(parents=True)
    for kind in ("sft", "preferences", "prompts", "eval"):
        shutil.copy(data_dir / f"{kind}.jsonl", allowed / f"{kind}.jsonl")
    raw = tiny_raw_config(tiny_model, data_dir, tmp_path)
    raw["data"] = {k: str(allowed / f"{k}.jsonl") for k in ("sft", "preferences", "prompts", "eval")}
    raw["evaluate"]["benchmarks"] = [{"task": "mc", "include_path": str(task_dir)}]
    outside = tmp_path / "outside.jsonl"
    outside.write_text('{"q": "?", "choices": ["a", "b"], "answer": 0}\n')
    (task_dir / "mc.yaml").write_text(
        f"task: mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {outside}\n"
    )
    monkeypatch.setenv("TUNEGATE_DATA_ROOTS", str(allowed))
    with pytest.raises(
        ConfigError, match=r"evaluate.benchmarks.0.include_path: .*outside.jsonl .* outside the data roots"
    ):
        check_data_roots(parse_config(raw))
    (task_dir / "mc.yaml").write_text("task: mc\ndataset_path: json\n")  # nothing outside: fine
    check_data_roots(parse_config(raw))


def test_credentials_inside_a_uri_are_refused_before_they_reach_a_log():
    for key, uri in (
        ("registry.tracking_uri", "https://bob:hunter2@mlflow.example.com"),
        ("registry.artifact_root", "s3://AKIA:secret@bucket/prefix"),
        ("run.artifact_root", "gs://user:pw@bucket/x"),
    ):
        with pytest.raises(ConfigError, match=f"{key} carries a user name or password"):
            load_config(None, [f"{key}={uri}"])
