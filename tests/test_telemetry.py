"""Training telemetry: throughput, peak memory and progress from a real (tiny) SFT run, per-step metrics
in MLflow; how tokens are counted across a resume; the Prefect progress artifact and log forwarding."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
from mlflow import MlflowClient
from prefect import flow, task

from flows.cli import summary
from flows.progress import (
    LIBRARY_LOGGERS,
    OWN_LOGGERS,
    forward_stage_logs,
    stage_telemetry,
    telemetry_table,
    watch,
)
from tasks.sft import train_sft
from tasks.telemetry import Telemetry, write_progress
from tunegate.artifacts import ModelArtifact
from tunegate.config import SftSection


def test_sft_reports_throughput_memory_progress_and_per_step_metrics(stage_inputs, tmp_path, caplog):
    cfg, base, dataset, _ = stage_inputs
    sft_cfg = SftSection.model_validate({**cfg.sft.model_dump(), "max_steps": 4, "logging_steps": 2})
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        experiment = mlflow.create_experiment("telemetry", artifact_location=str(tmp_path / "art"))
        with (
            caplog.at_level(logging.INFO, logger="tasks.telemetry"),
            mlflow.start_run(experiment_id=experiment) as run,
        ):
            sft = train_sft(sft_cfg, dataset, base, out_dir=tmp_path / "sft", seed=1)
        client = MlflowClient()
        history = {
            name: {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
            for name in ("loss", "tokens_per_s", "samples_per_s", "peak_memory_mib")
        }
    finally:
        mlflow.set_tracking_uri(previous)

    m = sft.metrics
    # 4 optimizer steps of 4 rows, one process, no accumulation
    assert m["train_samples"] == 16
    assert m["train_tokens"] > m["train_samples"]  # each row is many tokens
    assert m["train_tokens_per_s"] == pytest.approx(m["train_tokens"] / m["train_seconds"])
    assert m["train_samples_per_s"] == pytest.approx(16 / m["train_seconds"])
    assert m["train_tokens_per_s"] > 0 and m["peak_memory_mib"] > 0

    progress = json.loads((tmp_path / "sft" / "progress.json").read_text())
    assert progress["stage"] == "sft" and progress["finished"] is True
    assert progress["step"] == progress["max_steps"] == 4
    assert math.isfinite(progress["loss"]) and progress["eta_s"] == 0

    # the trainer's own figures and ours, at the same logging steps of the stage's MLflow run
    assert set(history["loss"]) == {2, 4}
    for name in ("tokens_per_s", "samples_per_s", "peak_memory_mib"):
        assert set(history[name]) == {2, 4}, name
        assert all(v > 0 for v in history[name].values()), name

    lines = [r.getMessage() for r in caplog.records if r.name == "tasks.telemetry"]
    assert any(
        line.startswith("sft step 2/4") and "loss=" in line and "tokens_per_s=" in line for line in lines
    )
    assert any(line.startswith("sft trained 4 steps") for line in lines)


class GRPOConfig(SimpleNamespace):
    """Stands in for TRL's GRPOConfig: its `num_tokens` is the trainer state's restored counter."""


def _args(cls=SimpleNamespace):
    return cls(
        device=SimpleNamespace(type="cpu"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=3,
        world_size=1,
        report_to=[],
    )


@pytest.mark.parametrize(
    ("args", "logged_tokens"),
    [
        (_args(), 400.0),  # SFT, reward, DPO: counted from zero in each train() call
        (_args(GRPOConfig), 1400.0),  # GRPO, RLOO: the state's counter, 1000 at the checkpoint
    ],
)
def test_a_resumed_stage_counts_only_the_tokens_and_samples_of_this_call(args, logged_tokens, tmp_path):
    state = SimpleNamespace(
        global_step=10, max_steps=14, num_input_tokens_seen=1000, is_world_process_zero=True
    )
    t = Telemetry("align", tmp_path / "progress.json")
    t.on_train_begin(args, state, None)
    state.global_step = 12
    logs = {"loss": 1.5, "num_tokens": logged_tokens}
    t.on_log(args, state, None, logs)
    assert logs["tokens_per_s"] > 0 and logs["samples_per_s"] > 0
    t.on_log(args, state, None, {"eval_loss": 9.0, "eval_num_tokens": 99999.0})  # evaluation: not training
    state.global_step = 14
    t.on_log(args, state, None, {"loss": 1.2, "num_tokens": logged_tokens + 100})
    t.on_log(args, state, None, {"train_runtime": 2.0, "train_loss": 1.3})  # the closing summary
    t.on_train_end(args, state, None)

    totals = t.totals()
    assert totals["train_tokens"] == 500
    assert totals["train_samples"] == 4 * 2 * 3
    assert totals["train_seconds"] == 2.0 and totals["train_tokens_per_s"] == 250
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert (progress["step"], progress["max_steps"], progress["loss"]) == (14, 14, 1.2)


def test_summary_table_lists_each_trained_stage():
    sft = ModelArtifact(
        path="m",
        role="sft",
        base_model="b",
        digest="d",
        steps=4,
        metrics={
            "train_seconds": 2.0,
            "train_tokens_per_s": 812.5,
            "train_samples_per_s": 8.0,
            "eval_loss": 1.0,
        },
    )
    telemetry = stage_telemetry({"sft": sft, "reward": None})
    assert telemetry == {
        "sft": {"steps": 4.0, "train_seconds": 2.0, "train_tokens_per_s": 812.5, "train_samples_per_s": 8.0}
    }
    header, row = telemetry_table(telemetry)
    assert header.split() == ["stage", "steps", "seconds", "tokens/s", "samples/s", "peak", "MiB"]
    assert row.split() == ["sft", "4", "2.0", "812.5", "8.00", "-"]

    result = {
        "verdict": {"markdown": "## Gate verdict: PASS"},
        "registration": {"promoted": True, "model_name": "m", "version": "3", "aliases": ["champion"]},
        "tracking_uri": "sqlite:///mlflow.db",
        "mlflow_run_id": "abc",
        "experiment": "e",
        "run_dir": "runs/x",
        "flow_run_id": "f-1",
    }
    assert f"  {row}\n" in summary({**result, "telemetry": telemetry})
    assert "tokens/s" not in summary(result)  # a flow result without figures: no table


def test_watch_outside_a_run_does_nothing(tmp_path):
    with watch("sft", tmp_path / "progress.json", interval_s=0.01):
        write_progress(tmp_path / "progress.json", {"step": 1, "max_steps": 2})


# --- inside Prefect runs ---------------------------------------------------------------------------


@pytest.fixture
def restore_loggers():
    names = (*OWN_LOGGERS, *LIBRARY_LOGGERS)
    saved = {n: (logging.getLogger(n).level, list(logging.getLogger(n).handlers)) for n in names}
    yield
    for n, (level, handlers) in saved.items():
        logging.getLogger(n).setLevel(level)
        logging.getLogger(n).handlers[:] = handlers


def _progress(step: int, loss: float, eta: float) -> dict:
    return {"stage": "sft", "step": step, "max_steps": 4, "loss": loss, "eta_s": eta, "tokens_per_s": 800.0}


@task
def training_like_stage(progress_file: Path, fail: bool) -> None:
    with watch("sft", progress_file, interval_s=0.05):
        write_progress(progress_file, _progress(1, 2.5, 30.0))
        time.sleep(0.3)  # the watcher reads it at least once
        write_progress(progress_file, _progress(2, 2.25, 20.0))
        logging.getLogger("tasks.sft").info("sft step 2/4: loss=2.25")
        if fail:
            raise RuntimeError("the trainer crashed")


@flow
def stage_flow(progress_file: Path, fail: bool):
    """Runs the stage; returns its task run's id, whether the stage failed or not."""
    forward_stage_logs()
    return training_like_stage(progress_file, fail, return_state=True).state_details.task_run_id


def _task_artifact(client, task_run_id):
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterTaskRunId,
        FlowRunFilter,
        TaskRunFilter,
    )

    # Every field spelled out: Prefect 3.8.8's client sends the missing ones as nulls, which its server
    # refuses (422).
    (artifact,) = client.read_artifacts(
        artifact_filter=ArtifactFilter(task_run_id=ArtifactFilterTaskRunId(any_=[task_run_id])),
        flow_run_filter=FlowRunFilter(),
        task_run_filter=TaskRunFilter(),
        limit=10,
        offset=0,
        sort="CREATED_DESC",
    )
    return artifact


@pytest.mark.integration  # a temporary Prefect server
def test_watch_shows_progress_to_100_and_stage_logs_reach_the_task_run(
    prefect_api, tmp_path, restore_loggers
):
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId

    task_run_id = stage_flow(tmp_path / "progress.json", False)
    with get_client(sync_client=True) as client:
        artifact = _task_artifact(client, task_run_id)
        assert (artifact.type, artifact.key, artifact.data) == ("progress", "sft-progress", 100.0)
        assert "loss 2.25" in artifact.description and "done in" in artifact.description
        messages: list[str] = []
        for _ in range(50):  # logs reach the API in batches
            logs = client.read_logs(
                log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run_id])), limit=200, offset=0
            )
            messages = [entry.message for entry in logs]
            if "sft step 2/4: loss=2.25" in messages:
                break
            time.sleep(0.2)
    assert "sft step 2/4: loss=2.25" in messages


@pytest.mark.integration  # a temporary Prefect server
def test_a_failed_stage_keeps_its_last_progress_and_says_where_it_stopped(
    prefect_api, tmp_path, restore_loggers
):
    from prefect import get_client

    task_run_id = stage_flow(tmp_path / "progress.json", True)
    with get_client(sync_client=True) as client:
        assert client.read_task_run(task_run_id).state.is_failed()
        artifact = _task_artifact(client, task_run_id)
    assert artifact.data == 50.0  # step 2 of 4
    assert "Stopped at step 2" in artifact.description and "ETA 0m20s" in artifact.description
