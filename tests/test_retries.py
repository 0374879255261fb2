"""Which failures Prefect retries (flows/retries.py): by type and structured fields, never by wording;
out of memory never, and it becomes an error that names the settings to lower."""

from __future__ import annotations

import errno
import json
import socket
import sqlite3

import httpx
import pytest
import requests
import torch
import urllib3.exceptions as u3
from mlflow.exceptions import MlflowException, RestException
from mlflow.protos.databricks_pb2 import INVALID_STATE, TEMPORARILY_UNAVAILABLE
from prefect import flow, task
from prefect.exceptions import PrefectHTTPStatusError

from flows.placement import WorkerLost
from flows.retries import is_transient, retry_transient
from tunegate.errors import (
    OutOfMemory,
    StoreUnavailable,
    TrainingError,
    from_outcome,
    to_outcome,
)
from tunegate.out_of_memory import MAX_CAUSES, as_stage_error, causes, is_out_of_memory

CUDA_OOM = "CUDA out of memory. Tried to allocate 502.00 MiB (GPU 0; 79.15 GiB total capacity)"


def _http_error(status: int) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(f"{status} error for url: http://127.0.0.1:5000/api", response=response)


def _httpx_status(status: int, cls: type[httpx.HTTPStatusError] = httpx.HTTPStatusError):
    request = httpx.Request("GET", "http://127.0.0.1:4200/api/flows")
    return cls(f"status {status}", request=request, response=httpx.Response(status, request=request))


def _raised(exc: BaseException, *, cause: BaseException | None = None, context: BaseException | None = None):
    """`exc` as Python leaves it once raised from `cause` or while handling `context`."""
    try:
        if context is None:
            raise exc from cause
        try:
            raise context
        except BaseException:
            raise exc  # noqa: B904 - the implicit context is what this builds
    except BaseException as caught:
        return caught


# --- Prefect retries a task only for a transient failure -------------------------------------------


@pytest.mark.integration  # a temporary Prefect server
@pytest.mark.parametrize(
    ("make_error", "runs"),
    [
        pytest.param(lambda: torch.OutOfMemoryError(CUDA_OOM), 1, id="cuda-oom-once"),
        pytest.param(lambda: RuntimeError("stage failed. Tried to allocate 502.00 MiB"), 1, id="502-in-text"),
        pytest.param(
            lambda: ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), 3, id="refused"
        ),
        pytest.param(lambda: _http_error(503), 3, id="requests-503"),
        pytest.param(lambda: _http_error(404), 1, id="requests-404"),
        pytest.param(
            lambda: RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "x"}),
            3,
            id="mlflow-503",
        ),
        pytest.param(
            lambda: RestException({"error_code": "BAD_REQUEST", "message": "x"}), 1, id="mlflow-400"
        ),
        pytest.param(
            lambda: _raised(RuntimeError("the sft stage failed"), cause=ConnectionResetError()), 3, id="chain"
        ),
        pytest.param(
            lambda: _raised(TrainingError("sft: nothing trained"), cause=ConnectionResetError()),
            1,
            id="tunegate-error-with-a-network-cause",
        ),
    ],
)
def test_a_stage_task_runs_again_only_after_a_transient_failure(prefect_api, make_error, runs):
    calls: list[int] = []

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_transient)
    def stage() -> None:
        calls.append(1)
        raise make_error()

    @flow
    def pipeline() -> bool:  # as in flows/pipeline.py: the stage's task inside a flow run
        return stage(return_state=True).is_failed()

    assert pipeline()
    assert len(calls) == runs


# --- is_transient: type and structured fields ------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionResetError("reset by peer"),
        TimeoutError("read timed out"),
        OSError(errno.EHOSTUNREACH, "No route to host"),
        WorkerLost("sft: flow run crashed (worker lost or preempted)"),
        requests.ConnectionError("HTTPConnectionPool(host='127.0.0.1', port=5000): Max retries exceeded"),
        requests.Timeout("read timeout"),
        _http_error(502),
        u3.ProtocolError("Connection aborted.", ConnectionResetError()),
        u3.NewConnectionError(None, "Failed to establish a new connection: [Errno 111] Connection refused"),
        u3.MaxRetryError(None, "/api", reason=u3.NewConnectionError(None, "refused")),
        u3.MaxRetryError(None, "/api", reason=u3.ResponseError("too many 503 error responses")),
        httpx.ConnectError("[Errno 111] Connection refused"),
        httpx.ReadTimeout("timed out"),
        _httpx_status(503),
        _httpx_status(500, PrefectHTTPStatusError),
        MlflowException("store unavailable", error_code=TEMPORARILY_UNAVAILABLE),
        RestException({"error_code": "503", "message": "upstream down"}),  # an HTTP status as the code
        RestException({"error_code": "INTERNAL_ERROR", "message": "server error"}),
        sqlite3.OperationalError("database is locked"),
    ],
    ids=lambda exc: type(exc).__name__,
)
def test_transient(exc):
    assert is_transient(exc)


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("sft.jsonl:7: role 'robot' is not one of the allowed roles"),
        RuntimeError("upstream 503 while connection refused: database is locked, timed out"),  # words only
        OSError("Connection refused by 127.0.0.1:5000"),  # no errno: nothing says it is the network
        _http_error(404),
        _http_error(501),  # Not Implemented: the same request never works
        requests.exceptions.SSLError("certificate verify failed"),
        u3.MaxRetryError(None, "/api", reason=u3.SSLError("certificate verify failed")),
        httpx.UnsupportedProtocol("Request URL has an unsupported protocol 'htp://'"),
        _httpx_status(422, PrefectHTTPStatusError),
        MlflowException("Could not find a registered artifact repository"),  # default code: raised here
        MlflowException("run is not active", error_code=INVALID_STATE),  # a 500 that is a verdict
        RestException({"error_code": "BAD_REQUEST", "message": "bad"}),
        RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no such run"}),
        sqlite3.OperationalError("no such table: runs"),
        StoreUnavailable("the MLflow tracking server at http://127.0.0.1:5000 did not answer"),
        torch.OutOfMemoryError(CUDA_OOM),
        MemoryError(),
    ],
    ids=lambda exc: f"{type(exc).__name__}-{str(exc)[:24]}",
)
def test_not_transient(exc):
    assert not is_transient(exc)


def test_causes_decide_out_of_memory_wins_and_sqlite_speaks_for_itself():
    # MLflow raises a bare MlflowException while handling the requests error: the context decides.
    down = _raised(
        MlflowException("API request to http://127.0.0.1:5000 failed"), context=requests.ConnectionError()
    )
    assert is_transient(down)
    # `raise ... from None` hides the context, as a traceback does.
    assert not is_transient(_raised(ValueError("bad value"), cause=None, context=None))
    hidden = _raised(ValueError("x"), context=ConnectionResetError())
    hidden.__suppress_context__ = True
    assert not is_transient(hidden)
    # Out of memory anywhere in the chain: never retried, whatever else the chain holds.
    assert not is_transient(_raised(ConnectionResetError(), cause=torch.OutOfMemoryError(CUDA_OOM)))
    # MLflow calls every sqlite OperationalError TEMPORARILY_UNAVAILABLE: the sqlite error decides.
    missing = _raised(
        MlflowException("no such table: runs", error_code=TEMPORARILY_UNAVAILABLE),
        cause=sqlite3.OperationalError("no such table: runs"),
    )
    locked = _raised(
        MlflowException("database is locked", error_code=TEMPORARILY_UNAVAILABLE),
        cause=sqlite3.OperationalError("database is locked"),
    )
    assert not is_transient(missing) and is_transient(locked)


def test_a_looping_chain_is_walked_a_bounded_number_of_links():
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__cause__, b.__cause__ = b, a
    assert [str(e) for e in causes(a)] == ["a", "b"] and not is_transient(a)
    long = ValueError("0")
    for i in range(1, 50):
        long = _raised(ValueError(str(i)), cause=long)
    assert len(list(causes(long))) == MAX_CAUSES


def test_a_locked_sqlite_database_is_transient_by_its_error_code(tmp_path):
    db = tmp_path / "store.db"
    holder = sqlite3.connect(db, timeout=0, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    other = sqlite3.connect(db, timeout=0)
    with pytest.raises(sqlite3.OperationalError) as locked:
        other.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(sqlite3.OperationalError) as missing:
        holder.execute("SELECT * FROM no_such_table")
    holder.close()
    other.close()
    assert locked.value.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    assert is_transient(locked.value) and not is_transient(missing.value)


def test_mlflow_against_a_closed_port_is_transient(monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(MlflowException) as failed:
        MlflowClient(tracking_uri=f"http://127.0.0.1:{port}").search_experiments()
    assert failed.value.error_code == "INTERNAL_ERROR"  # the code says nothing: the chain does
    assert is_transient(failed.value)


# --- out of memory: never retried, named with the settings to lower ---------------------------------


def test_a_cuda_out_of_memory_in_sft_names_the_settings_to_lower():
    with pytest.raises(
        OutOfMemory,
        match=(
            r"sft ran out of memory \(OutOfMemoryError: CUDA out of memory\. Tried to allocate 502\.00 MiB.*\)\. "
            r"To run it, lower its memory use: sft\.per_device_train_batch_size \(raise "
            r"sft\.gradient_accumulation_steps to keep the effective batch\); sft\.max_length; "
            r"sft\.trl_args\.gradient_checkpointing: true; sft\.mode: lora instead of full or partial\. "
            r"Not retried"
        ),
    ) as raised:
        raise as_stage_error(torch.OutOfMemoryError(CUDA_OOM), "sft")
    error = raised.value
    assert isinstance(error, TrainingError) and error.stage == "sft"
    assert isinstance(error.__cause__, torch.OutOfMemoryError)
    assert not is_transient(error)


@pytest.mark.parametrize(
    ("stage", "names"),
    [
        ("reward-model", r"reward\.per_device_train_batch_size.*reward\.max_length.*reward\.mode: lora"),
        (
            "align",
            r"align\.per_device_train_batch_size.*align\.num_generations and align\.max_completion_length",
        ),
        ("evaluate", r"lower its memory use: evaluate\.batch_size; evaluate\.max_new_tokens\."),
        ("build", r"build ran out of memory .*To run it, free memory on the machine\."),
    ],
)
def test_each_stage_names_its_own_settings(stage, names):
    with pytest.raises(OutOfMemory, match=names):
        raise as_stage_error(MemoryError(), stage)


def test_the_cpu_allocator_running_out_is_out_of_memory():
    with pytest.raises(RuntimeError, match="DefaultCPUAllocator: can't allocate memory") as real:
        torch.empty(2**60, dtype=torch.uint8)  # fails at once: nothing is allocated
    assert is_out_of_memory(real.value) and not is_transient(real.value)
    wrapped = _raised(RuntimeError("the evaluate stage failed"), cause=real.value)
    with pytest.raises(OutOfMemory, match=r"evaluate ran out of memory \(RuntimeError: the evaluate stage"):
        raise as_stage_error(wrapped, "evaluate")


def test_any_other_error_comes_back_unchanged():
    for exc in (ValueError("bad"), ConnectionResetError(), RuntimeError("Tried to allocate 502.00 MiB")):
        assert as_stage_error(exc, "sft") is exc
    already = OutOfMemory("sft ran out of memory", stage="sft")
    assert as_stage_error(already, "sft") is already


def test_out_of_memory_crosses_processes_as_itself():
    error = as_stage_error(torch.OutOfMemoryError(CUDA_OOM), "align")
    again = from_outcome(json.loads(json.dumps(to_outcome(error))))
    assert type(again) is OutOfMemory and str(again) == str(error)
    assert (
        again.stage == "align" and again.settings == error.settings and "align.num_generations" in str(again)
    )
