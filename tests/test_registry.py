"""Registration on the tiny model (CPU): what a version holds (merged weights, or an adapter that
references its local base), its generated model card, loading it back through MLflow, and serving it
with `mlflow models serve`."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest
import torch

from tasks.model_card import DESCRIPTION_LIMIT, description, model_card
from tasks.model_io import load_causal_lm
from tasks.registry import register_candidate
from tasks.sft import train_sft
from tunegate.artifacts import BASE_REF, GateResult, GateVerdict, ModelArtifact
from tunegate.config import RegistrySection, SftSection
from tunegate.errors import ConfigError, PromotionError

# Whole pipeline runs, real servers or subprocess drills: not in `make test-fast`.
pytestmark = pytest.mark.integration

NAME = "tiny-assistant"
PROMPT = [{"role": "user", "content": "Hello!"}]


def _verdict(passed: bool) -> GateVerdict:
    result = GateResult(
        gate="fact_accuracy >= 0.5",
        metric="fact_accuracy",
        op=">=",
        value=0.75 if passed else 0.25,
        reference="threshold",
        reference_value=None,
        required=0.5,
        passed=passed,
        why="0.75 >= 0.5" if passed else "0.25 < 0.5",
    )
    table = (
        f"## Gate verdict: {'PASS' if passed else 'FAIL'}\n\n| gate | candidate | result |\n|---|---:|:---:|\n"
        f"| `{result.gate}` | {result.value} | {'pass' if passed else 'FAIL'} |"
    )
    return GateVerdict(passed=passed, results=[result], markdown=table)


TAGS = {
    "prefect.flow_run_id": "local",
    "prefect.flow_run_url": "http://127.0.0.1:4200/runs/flow-run/abc",
    "tunegate.config_digest": "0123456789abcdef",
    "tunegate.git_commit": "deadbeef",
    "tunegate.base_model": "tiny-llama",
    "tunegate.base_model_digest": "f00dfeed" * 8,
}


@pytest.fixture(scope="module")
def candidates(stage_inputs, tmp_path_factory) -> dict[str, ModelArtifact]:
    """SFT on the tiny model, saved merged and as an adapter (two steps each)."""
    cfg, base, dataset, _ = stage_inputs
    out = tmp_path_factory.mktemp("candidates")
    return {
        save: train_sft(
            SftSection.model_validate({**cfg.sft.model_dump(), "save": save}),
            dataset,
            base,
            out_dir=out / save,
            seed=1,
        )
        for save in ("merged", "adapter")
    }


@pytest.fixture
def registry(tmp_path) -> RegistrySection:
    """A fresh store whose artifacts stay under tmp_path (not ./mlruns)."""
    reg = RegistrySection(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", model_name=NAME)
    mlflow.set_tracking_uri(reg.tracking_uri)
    exp = mlflow.create_experiment("registry-test", artifact_location=str(tmp_path / "artifacts"))
    mlflow.set_experiment(experiment_id=exp)
    return reg


def _register(reg: RegistrySection, candidate: ModelArtifact, passed: bool = True, tags=TAGS):
    with mlflow.start_run() as run:
        registration = register_candidate(
            reg, candidate, _verdict(passed), expected_champion=None, tags=tags, smoke_prompt=PROMPT
        )
    return registration, run.info.run_id


def _model_dir(uri: str, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(dst)))


def _pipeline_parent(candidate: ModelArtifact) -> str:
    """What the flow leaves in its parent run before registering: dataset inputs with row counts
    and one nested run per stage with its record (flows/pipeline.py)."""
    import pandas as pd

    with mlflow.start_run(run_name="pipeline") as parent:
        for split, rows in (("sft_train", 40), ("pref_train", 30), ("eval", 20)):
            ds = mlflow.data.from_pandas(pd.DataFrame({"prompt": ["x"]}), name=split)
            mlflow.log_input(ds, context="train", tags={"rows": str(rows)})
        with mlflow.start_run(run_name="sft", nested=True):
            mlflow.set_tag("tunegate.stage", "sft")
            mlflow.log_dict(candidate.model_dump(mode="json"), "record.json")
        with mlflow.start_run(run_name="evaluate", nested=True):
            mlflow.set_tag("tunegate.stage", "evaluate")
    return parent.info.run_id


def test_merged_version_loads_generates_and_carries_its_card(registry, candidates, tmp_path):
    candidate = candidates["merged"]
    pid = _pipeline_parent(candidate)
    tags = {**TAGS, "tunegate.parent_run_id": pid}
    with mlflow.start_run(run_id=pid), mlflow.start_run(run_name="register", nested=True):
        registration = register_candidate(
            registry, candidate, _verdict(True), expected_champion=None, tags=tags, smoke_prompt=PROMPT
        )
    assert registration.promoted and registration.version == "1", registration.reason

    parts = mlflow.transformers.load_model(f"models:/{NAME}@champion", return_type="components")
    model, tokenizer = parts["model"], parts["tokenizer"]
    enc = tokenizer.apply_chat_template(
        PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        assert torch.isfinite(model(**enc).logits).all()
        out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert out.shape[1] > enc["input_ids"].shape[1]

    client = mlflow.MlflowClient()
    version = client.get_model_version(NAME, "1")
    assert version.tags["tunegate.format"] == "merged" and version.tags["tunegate.parent_run_id"] == pid
    files = _model_dir(f"models:/{NAME}/1", tmp_path / "dl")
    assert (files / "model" / "model.safetensors").is_file()
    card = (files / "README.md").read_text()
    assert card.startswith("---\nlibrary_name:")
    for expected in (
        "**Status: passed every gate.**",
        f"| base digest | `{'f00dfeed' * 8}` |",
        "## Gate verdict: PASS",
        "| `fact_accuracy >= 0.5` |",
        f"| sft | 2 | `{candidate.digest[:16]}` |",  # the stage record from the pipeline run
        "| sft_train | 40 |",
        "supervised on 40 conversations",
        "the 20 held-out prompts",
        "| `tunegate.git_commit` | `deadbeef` |",
        "<http://127.0.0.1:4200/runs/flow-run/abc>",
        f'mlflow.transformers.load_model("models:/{NAME}@champion", return_type="components")',
        f"mlflow models serve -m models:/{NAME}@champion --env-manager local",
    ):
        assert expected in card, expected
    assert version.description == card.split("---\n", 2)[2]


def test_adapter_version_is_adapter_sized_and_loads_onto_its_base(
    registry, candidates, stage_inputs, tmp_path
):
    base, candidate = stage_inputs[1], candidates["adapter"]
    registration, _ = _register(registry.model_copy(update={"format": "adapter"}), candidate)
    assert registration.promoted, registration.reason

    files = _model_dir(f"models:/{NAME}/1", tmp_path / "dl")
    weights = {p.relative_to(files).as_posix(): p.stat().st_size for p in files.rglob("*.safetensors")}
    assert list(weights) == ["peft/adapter_model.safetensors"], weights
    base_size = (Path(base.path) / "model.safetensors").stat().st_size
    assert weights["peft/adapter_model.safetensors"] < base_size / 4
    assert "the adapter alone" in (files / "README.md").read_text()

    version = mlflow.MlflowClient().get_model_version(NAME, "1")
    assert version.tags["tunegate.format"] == "adapter"
    assert version.tags["tunegate.adapter_base.digest"] == base.digest
    assert version.tags["tunegate.adapter_base.path"] == base.path

    parts = mlflow.transformers.load_model(f"models:/{NAME}/1", return_type="components")
    assert type(parts["model"]).__name__.startswith("PeftModel")
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        served = parts["model"](ids).logits
        trained = load_causal_lm(candidate.path)[0](ids).logits
    assert torch.allclose(served, trained, atol=1e-5)


def test_adapter_format_needs_an_adapter_candidate_on_full_weights(registry, candidates, tmp_path):
    reg = registry.model_copy(update={"format": "adapter"})
    with pytest.raises(ConfigError, match="needs an adapter candidate.*set align.save: adapter"):
        _register(reg, candidates["merged"])

    # An adapter on an adapter (sft.save: adapter, then align.save: adapter): no full-weights base.
    stacked = tmp_path / "stacked"
    shutil.copytree(candidates["adapter"].path, stacked)
    lower = candidates["adapter"].model_copy(update={"role": "sft"})
    (stacked / BASE_REF).write_text(json.dumps(lower.model_dump(mode="json")))
    on_adapter = candidates["adapter"].model_copy(update={"path": str(stacked), "role": "align"})
    with pytest.raises(ConfigError, match="itself an adapter.*set sft.save: merged"):
        _register(reg, on_adapter)

    gone = candidates["adapter"].model_copy(update={"path": str(tmp_path / "missing-base")})
    (stacked / BASE_REF).write_text(json.dumps(gone.model_dump(mode="json")))
    with pytest.raises(PromotionError, match="missing-base .*is gone; it must stay in place"):
        _register(reg, on_adapter)

    (stacked / BASE_REF).unlink()
    with pytest.raises(ConfigError, match="has no tunegate_base.json"):
        _register(reg, on_adapter)

    client = mlflow.MlflowClient()
    assert client.search_registered_models() == []
    assert mlflow.search_logged_models(output_format="list") == []


def test_failing_candidate_is_logged_for_audit_with_a_failed_card(registry, candidates, tmp_path):
    registration, run_id = _register(registry, candidates["merged"], passed=False)
    assert not registration.promoted and registration.version is None
    assert mlflow.MlflowClient().search_registered_models() == []

    audit = mlflow.get_run(run_id).data.tags["tunegate.audit_model_uri"]
    card = (_model_dir(audit, tmp_path / "dl") / "README.md").read_text()
    assert "**Status: FAILED** (gates failed: `fact_accuracy >= 0.5`)" in card
    assert "## Gate verdict: FAIL" in card and "mlflow models serve" not in card


def test_a_promotion_lock_held_past_its_timeout_ends_not_promoted_and_says_so(registry, tiny_model):
    from tasks.promotion_lock import promotion_lock

    candidate = ModelArtifact(path=str(tiny_model), role="align", base_model=str(tiny_model), digest="c")
    with promotion_lock(registry)():  # another run, promoting
        with mlflow.start_run():
            registration = register_candidate(
                registry,
                candidate,
                _verdict(True),
                expected_champion=None,
                tags=TAGS,
                smoke_prompt=PROMPT,
                lock=promotion_lock(registry, timeout_s=0.5),
            )
    assert not registration.promoted and registration.version is None
    assert f"another process held the promotion lock of {NAME}" in registration.reason
    assert "whole 0.5 s timeout" in registration.reason and "not registered: run again" in registration.reason
    assert mlflow.MlflowClient().search_registered_models() == []


def test_a_long_card_is_cut_to_fit_the_version_description(stage_inputs):
    verdict = _verdict(True)
    long = verdict.model_copy(update={"markdown": verdict.markdown + "\n| x | 1 | pass |" * 600})
    card = model_card(RegistrySection(model_name=NAME), stage_inputs[1], long, TAGS)
    text = description(card)
    assert len(card) > DESCRIPTION_LIMIT >= len(text)
    assert text.endswith(
        "Left out to fit: Gate verdict: PASS, Training, Lineage. The full card is README.md in the model's "
        "artifacts.)\n"
    )
    assert "## Serve" in text
    assert description(
        model_card(RegistrySection(model_name=NAME), stage_inputs[1], verdict, TAGS)
    ).startswith(f"# {NAME}\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status, json.loads(response.read())


def test_mlflow_models_serve_answers_invocations_for_a_registered_adapter(registry, candidates, tmp_path):
    registration, _ = _register(registry.model_copy(update={"format": "adapter"}), candidates["adapter"])
    assert registration.promoted, registration.reason

    port = _free_port()
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": registry.tracking_uri,
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",  # the server execs `uvicorn`
    }
    command = [str(bin_dir / "mlflow"), "models", "serve", "-m", f"models:/{NAME}/1"]
    command += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    log = open(tmp_path / "serve.log", "w")
    # Its own process group: the CLI starts uvicorn as a child, and stopping must reach both.
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline, (
                "no /ping within 120 s\n" + (tmp_path / "serve.log").read_text()
            )
            time.sleep(1)
        status, body = _post(
            f"http://127.0.0.1:{port}/invocations",
            {"inputs": ["Hello!", "What is your refund policy?"], "params": {"max_new_tokens": 4}},
        )
        assert status == 200
        predictions = body["predictions"]
        assert len(predictions) == 2 and all(isinstance(p, str) for p in predictions)
        assert "Ignoring provided params" not in (tmp_path / "serve.log").read_text()
    finally:
        _stop(server)
        log.close()


def _stop(server: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
