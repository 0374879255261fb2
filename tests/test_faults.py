"""Faults injected into real runs: the MLflow tracking server (a real `mlflow server` on 127.0.0.1)
down at the start, stopped in the middle of training and at registration. Each time the run fails
within its bounded retries with a clear error, no alias moves, nothing is left half-registered, and
once the server is back a rerun completes."""

from __future__ import annotations

import functools
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

import tasks.promotion_lock
import tasks.registry
from flows.pipeline import pipeline
from flows.stack import Service, mlflow_server
from tests.conftest import tiny_raw_config
from tunegate.config import parse_config
from tunegate.errors import StoreUnavailable

# Whole pipeline runs, real servers or subprocess drills: not in `make test-fast`.
pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TrackingServer:
    """A real MLflow tracking server that the test stops and starts again on the same store."""

    def __init__(self, home: Path) -> None:
        self.home, self.port = home, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.service: Service | None = None

    def start(self) -> None:
        import os

        cmd, env = mlflow_server(self.home, self.port, os.environ)  # as `tunegate up` starts it
        self.service = Service.start("mlflow-server", cmd, env, self.home, self.home)
        self.service.wait_healthy(f"{self.url}/health", time.monotonic() + 120)

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()
            self.service = None


@pytest.fixture
def server(tmp_path):
    srv = TrackingServer(tmp_path)
    yield srv
    srv.stop()


def _config(tiny_model, data_dir, tmp_path, server: TrackingServer, **run):
    raw = tiny_raw_config(tiny_model, data_dir, tmp_path)
    raw["run"].update(run)
    raw["registry"].update(tracking_uri=server.url, max_retries=1, timeout_s=10)
    del raw["registry"]["artifact_root"]  # artifacts go through the tracking server
    return parse_config(raw)


def _versions(server: TrackingServer) -> dict[str, dict[str, str]]:
    client = MlflowClient(tracking_uri=server.url, registry_uri=server.url)
    return {str(v.version): v.tags for v in client.search_model_versions("name='tiny-assistant'")}


def _aliases(server: TrackingServer) -> dict[str, str]:
    client = MlflowClient(tracking_uri=server.url, registry_uri=server.url)
    return {k: str(v) for k, v in client.get_registered_model("tiny-assistant").aliases.items()}


def test_tracking_server_down_at_start_fails_fast_and_says_what_to_do(
    prefect_api, tiny_model, data_dir, tmp_path, server
):
    cfg = _config(tiny_model, data_dir, tmp_path, server)  # never started
    start = time.monotonic()
    with pytest.raises(StoreUnavailable, match=rf"MLflow tracking server at {server.url} did not answer"):
        pipeline(cfg)
    # bounded: one retry per request, not MLflow's default of seven with backoff (minutes)
    assert time.monotonic() - start < 120
    assert not (tmp_path / "runs" / "checkpoints").exists()  # nothing started training


def test_tracking_server_lost_at_registration_leaves_no_half_registered_version_and_a_rerun_finishes_it(
    prefect_api, tiny_model, data_dir, tmp_path, server, monkeypatch
):
    server.start()
    cfg = _config(tiny_model, data_dir, tmp_path, server)
    real_smoke_test = tasks.registry.smoke_test

    def server_dies_during_smoke_test(*args, **kwargs):
        server.stop()  # the version exists (pending) and holds `challenger`; then the server is gone
        return real_smoke_test(*args, **kwargs)

    monkeypatch.setattr(tasks.registry, "smoke_test", server_dies_during_smoke_test)
    # The dead run could not release its promotion lease: the rerun waits for the lease to lapse
    # (60 s by default; test_promotion_race checks the lease itself), here 3 s.
    lease = functools.partial(tasks.promotion_lock.registry_lock, lease_s=3.0, poll_s=0.2)
    monkeypatch.setattr(tasks.promotion_lock, "registry_lock", lease)
    with pytest.raises(StoreUnavailable, match="no alias moved"):
        pipeline(cfg)
    monkeypatch.setattr(tasks.registry, "smoke_test", real_smoke_test)

    server.start()
    [(version, tags)] = _versions(server).items()
    assert tags["tunegate.registration"] == "pending"
    assert "champion" not in _aliases(server)  # never served

    result = pipeline(cfg)  # every stage from the cache; the pending registration is finished
    assert result["registration"]["promoted"] and result["registration"]["version"] == version
    [(again, tags)] = _versions(server).items()  # registered once
    assert again == version and tags["tunegate.registration"] == "complete"
    assert tags["tunegate.completed_by_run_id"] == result["mlflow_run_id"]
    assert _aliases(server) == {"champion": version}


def test_tracking_server_lost_during_training_fails_clearly_and_a_rerun_completes(
    prefect_api, tiny_model, data_dir, tmp_path, server
):
    server.start()
    cfg = _config(tiny_model, data_dir, tmp_path, server)
    checkpoints = tmp_path / "runs" / "checkpoints"
    stopped = threading.Event()

    def stop_when_sft_starts() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not list(checkpoints.glob(".sft-*.lock")):
            time.sleep(0.05)
        server.stop()
        stopped.set()

    killer = threading.Thread(target=stop_when_sft_starts, daemon=True)
    killer.start()
    with pytest.raises(StoreUnavailable, match="start the server again and rerun"):
        pipeline(cfg)
    killer.join(timeout=60)
    assert stopped.is_set()

    server.start()
    assert _versions(server) == {}
    result = pipeline(cfg)
    assert result["registration"]["promoted"]
    assert _aliases(server) == {"champion": result["registration"]["version"]}
    assert len(_versions(server)) == 1


RUN = "import sys; from flows.cli import main; sys.exit(main(sys.argv[1:]))"


def test_a_pipeline_killed_in_each_training_stage_resumes_from_checkpoints_and_registers_once(
    tiny_model, data_dir, tmp_path
):
    """`tunegate run` as a real process, SIGKILLed (with everything it started) once it has written
    the second checkpoint of SFT, then of the reward model, then of alignment; each rerun takes the
    finished stages from the cache and resumes the killed one from its last checkpoint."""
    import os
    import signal
    import subprocess

    import yaml

    raw = tiny_raw_config(tiny_model, data_dir, tmp_path)
    for section in ("sft", "reward", "align"):
        raw[section].update(max_steps=6, checkpoint_steps=2)
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    checkpoints = tmp_path / "runs" / "checkpoints"

    def run(kill_in: str | None) -> str:
        log = tmp_path / f"run-{kill_in or 'final'}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-c", RUN, "run", "--config", str(cfg_path)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: the kill reaches all it started
            )
        if kill_in is None:
            assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
            return log.read_text()
        deadline = time.monotonic() + 600
        while not list(checkpoints.glob(f"{kill_in}-*/checkpoint-4/tunegate-checksums.json")):
            assert proc.poll() is None, f"ended before {kill_in} checkpointed:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        return log.read_text()

    for stage in ("sft", "reward", "align"):
        run(kill_in=stage)
    final = run(kill_in=None)
    assert "alias champion" in final, final[-2000:]

    client = MlflowClient(tracking_uri=raw["registry"]["tracking_uri"])
    assert len(client.search_model_versions("name='tiny-assistant'")) == 1  # registered once
    experiment = client.get_experiment_by_name("test").experiment_id
    for stage in ("sft", "reward-model", "align"):
        runs = client.search_runs([experiment], filter_string=f"tags.`tunegate.stage` = '{stage}'")
        resumed = [r.data.metrics.get("final.resumed_from_step") for r in runs]
        assert 4.0 in resumed, (stage, resumed)  # the run after the kill went on from checkpoint-4


def test_only_failures_that_name_the_tracking_server_are_reported_as_it_being_down():
    from flows.pipeline import _tracking_server_unreachable as unreachable

    uri = "http://127.0.0.1:5000"
    down = ConnectionError(
        "API request to http://127.0.0.1:5000/api/2.0/mlflow/runs/create failed: Max retries exceeded"
    )
    assert unreachable(RuntimeError("stage failed").with_traceback(None), uri) is False
    assert (
        unreachable(RuntimeError("sqlite3.OperationalError: database is locked"), uri) is False
    )  # Prefect's
    wrapped = RuntimeError("the sft stage failed")
    wrapped.__cause__ = down
    assert unreachable(wrapped, uri) and unreachable(down, uri)
    assert not unreachable(down, "sqlite:///mlflow.db")  # a local store has no server to be down
