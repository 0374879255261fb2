"""The `tunegate` command line: exit codes and what a person reads."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.cli import EPHEMERAL_STARTUP_TIMEOUT_S, main, prefect_startup_room, store_failure, summary
from tests.conftest import tiny_raw_config

BAD = "tests/assets/bad"


def _config_file(tmp_path, tiny_model, data_dir):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_raw_config(tiny_model, data_dir, tmp_path)))
    return str(path)


def test_validate_exit_codes(tmp_path, tiny_model, data_dir, capsys):
    cfg = _config_file(tmp_path, tiny_model, data_dir)
    assert main(["validate", str(data_dir / "sft.jsonl"), "--kind", "sft", "--config", cfg]) == 0
    assert "PASSED" in capsys.readouterr().out
    assert main(["validate", f"{BAD}/sft_bad_role.jsonl", "--kind", "sft", "--config", cfg]) == 1
    out = capsys.readouterr().out
    assert "FAIL  schema and roles" in out and "sft_bad_role.jsonl:1" in out and "fix:" in out
    assert (
        main(["validate", str(data_dir / "preferences.jsonl"), "--kind", "preference", "--config", cfg]) == 0
    )
    assert "preferences" in capsys.readouterr().out
    with pytest.raises(SystemExit) as usage:
        main(["validate", str(data_dir / "sft.jsonl"), "--kind", "sfft"])
    assert usage.value.code == 2
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("sft:\n  max_stpes: 1\n")
    assert main(["validate", str(data_dir / "sft.jsonl"), "--kind", "sft", "--config", str(bad_cfg)]) == 2
    assert "did you mean 'max_steps'" in capsys.readouterr().err


def test_validate_command_imports_neither_torch_nor_great_expectations(tmp_path, tiny_model, data_dir):
    """What kept `tunegate validate` at 11-19 s: the suite is evaluated with pandas unless --gx, and a
    plain fast tokenizer loads without AutoTokenizer (whose module imports torch)."""
    cfg = _config_file(tmp_path, tiny_model, data_dir)
    probe = (
        "import sys; from flows.cli import main; rc = main(sys.argv[1:]); "
        "print('HEAVY', sorted(m for m in ('torch', 'great_expectations') if m in sys.modules)); sys.exit(rc)"
    )
    gz = "tests/assets/sft.jsonl.gz"
    out = subprocess.run(
        [sys.executable, "-c", probe, "validate", gz, "--kind", "sft", "--config", cfg],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr
    assert f"source {gz}: JSON Lines, gzip, 5 rows; shape messages" in out.stdout


def test_config_command_prints_resolved_yaml(capsys):
    assert main(["config", "--config", "configs/demo.yaml", "sft.max_steps=7"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["sft"]["max_steps"] == 7 and resolved["validate"]["pii_policy"] == "block"


def test_summary_names_version_alias_and_uis():
    result = {
        "verdict": {"markdown": "## Gate verdict: PASS"},
        "registration": {"promoted": True, "model_name": "m", "version": "3", "aliases": ["champion"]},
        "tracking_uri": "sqlite:///mlflow.db",
        "mlflow_run_id": "abc",
        "experiment": "e",
        "run_dir": "runs/x",
        "flow_run_id": "f-1",
    }
    text = summary(result)
    assert "m version 3, alias champion (models:/m@champion)" in text
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in text and "flow run f-1" in text
    rejected = summary(
        {**result, "registration": {"promoted": False, "reason": "gates failed: x", "version": None}}
    )
    assert "NOT PROMOTED: gates failed: x" in rejected


# --- start-up and stores that do not answer: one line on stderr, never a traceback ------------------

ROOT = Path(__file__).resolve().parents[1]
RUN = "import sys; from flows.cli import main; sys.exit(main(sys.argv[1:]))"
# A minimal flow through the CLI's own set-up (flows.cli.guarded): every `tunegate` command that
# starts Prefect's temporary API server also trains or needs a tracking server.
TINY_FLOW = """
import sys
from flows.cli import guarded

def command():
    from prefect import flow
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as startup

    @flow
    def tiny() -> int:
        return startup.value()

    print(f"started; start-up timeout {tiny()} s")
    return 0

sys.exit(guarded(command))
"""


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(code: str, args: list[str], home: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PREFECT_") and k not in ("MLFLOW_TRACKING_URI", "PYTEST_CURRENT_TEST")
    }
    clean.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", **env)
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, env=clean, capture_output=True, text=True, timeout=120
    )


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("tunegate:")]
    return line


@pytest.fixture(scope="module")
def fresh_prefect_home(tmp_path_factory):
    """A Prefect home nothing has used, and the tiny flow run on it (which creates its database)."""
    home = tmp_path_factory.mktemp("prefect-home")
    start = time.monotonic()
    proc = _cli(TINY_FLOW, [], home)
    return home, proc, time.monotonic() - start


@pytest.mark.integration  # the CLI in a subprocess, starting Prefect
def test_a_fresh_prefect_home_starts_with_room_to_create_its_database(fresh_prefect_home):
    _, proc, seconds = fresh_prefect_home
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"start-up timeout {EPHEMERAL_STARTUP_TIMEOUT_S} s" in proc.stdout  # not Prefect's 20 s
    assert seconds < 120


@pytest.mark.integration  # the CLI in a subprocess, starting Prefect
def test_a_startup_timeout_the_user_set_wins():
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as startup
    from prefect.settings import temporary_settings

    # (unset, it is EPHEMERAL_STARTUP_TIMEOUT_S: see the fresh-home test; set in the environment: the next)
    with temporary_settings(updates={startup: 45}), prefect_startup_room():
        assert startup.value() == 45


@pytest.mark.integration  # the CLI in a subprocess, starting Prefect
def test_a_temporary_prefect_server_that_does_not_start_in_time_is_one_line(tmp_path):
    proc = _cli(TINY_FLOW, [], tmp_path / "prefect", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1")
    line = _one_line_error(proc)
    assert line.startswith("tunegate: Prefect's temporary API server did not start within 1 s"), line
    assert "set PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS higher" in line


@pytest.mark.integration  # the CLI in a subprocess, starting Prefect
def test_a_prefect_api_that_does_not_answer_is_one_line(tmp_path, tiny_model, data_dir):
    url = f"http://127.0.0.1:{_closed_port()}/api"
    cfg = _config_file(tmp_path, tiny_model, data_dir)
    proc = _cli(RUN, ["run", "--config", cfg], tmp_path / "prefect", PREFECT_API_URL=url)
    line = _one_line_error(proc)
    assert line.startswith(f"tunegate: the Prefect API at {url} did not answer (ConnectError: "), line
    assert "start it (`tunegate up`" in line


@pytest.mark.integration  # the CLI in a subprocess, starting Prefect
def test_a_tracking_server_that_does_not_answer_is_one_line(
    fresh_prefect_home, tmp_path, tiny_model, data_dir
):
    home, _, _ = fresh_prefect_home  # its database exists: only the tracking server is missing
    server = f"http://127.0.0.1:{_closed_port()}"
    cfg = _config_file(tmp_path, tiny_model, data_dir)
    overrides = [f"registry.tracking_uri={server}", "registry.max_retries=0", "registry.artifact_root=null"]
    proc = _cli(RUN, ["run", "--config", cfg, *overrides], home)
    line = _one_line_error(proc)
    assert line.startswith(f"tunegate: the MLflow tracking server at {server} did not answer"), line
    assert line.endswith(
        "start the server again and rerun: finished stages come from the cache, and "
        "a registration cut short is finished, not repeated"
    ), line


def test_store_failures_are_told_apart():
    import sqlite3

    import requests

    refused = requests.ConnectionError(
        "Max retries exceeded", request=requests.Request("GET", "http://h:5000/x")
    )
    assert store_failure(refused) == (
        "the MLflow tracking server at http://h:5000 did not answer (ConnectionError: Max retries exceeded); "
        "start it (`tunegate up`) and rerun"
    )
    locked = RuntimeError("write failed")
    locked.__cause__ = sqlite3.OperationalError("database is locked")
    assert store_failure(locked).startswith("the MLflow store is locked by another process")
    assert store_failure(ValueError("bad")) is None and store_failure(OSError("refused")) is None
