"""The local stack behind `tunegate up`: a Prefect server, an MLflow tracking server and a process
worker on 127.0.0.1, started together and stopped together on exit.

Where the stack keeps its state: with `home` unset, the working directory's `mlflow.db` and
`mlartifacts/` (the store `tunegate run` writes by default) and Prefect's own home (`~/.prefect`,
the database the ephemeral API writes), so both UIs also show runs made without the stack. With
`home` set, everything (Prefect's database included) lives under it: an isolated stack.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from flows.deploy import REPO, ServerError, ensure_pool


@dataclass(frozen=True)
class LocalStack:
    """Addresses of a running local stack."""

    prefect_url: str
    mlflow_url: str
    pool: str
    workdir: Path
    logs: Path
    training_pool: str | None = None
    services: tuple[Service, ...] = field(default=(), repr=False)

    @property
    def api_url(self) -> str:
        return f"{self.prefect_url}/api"

    def check_alive(self) -> None:
        """Raise ServerError if one of the stack's processes has exited."""
        for service in self.services:
            service.check_alive()


def up(
    home: str | Path | None = None,
    *,
    prefect_port: int = 4200,
    mlflow_port: int = 5000,
    pool: str = "local",
    training_pool: str | None = None,
) -> None:
    """`tunegate up`: start the local stack, print where it is, and keep it up until Ctrl-C or SIGTERM.

    Raises:
        ServerError: the stack could not start, or one of its processes exited.
    """
    # Ctrl-C and SIGTERM alike leave through local_stack's exit, which stops all three processes
    # (SIGINT too when a shell started this in the background with SIGINT ignored).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    print("starting the Prefect server, the MLflow server and a worker (first start: up to a minute) ...")
    try:
        with local_stack(
            home,
            prefect_port=prefect_port,
            mlflow_port=mlflow_port,
            pool=pool,
            training_pool=training_pool,
        ) as stack:
            training = (
                f"\n  worker:      pool {stack.training_pool!r} (training stages, run.placement: pools)"
                if stack.training_pool
                else ""
            )
            print(
                f"""
  Prefect UI:  {stack.prefect_url}
  MLflow UI:   {stack.mlflow_url}
  worker:      pool {stack.pool!r}, runs flows in {stack.workdir}{training}
  logs:        {stack.logs}

In another shell:
  export PREFECT_API_URL={stack.api_url} MLFLOW_TRACKING_URI={stack.mlflow_url}
  tunegate deploy registry.tracking_uri={stack.mlflow_url}   # then run `finetune` from the Prefect UI

Ctrl-C stops all three.""",
                flush=True,
            )
            while True:
                stack.check_alive()
                time.sleep(1)
    except KeyboardInterrupt:
        print("\nstopped the worker, the MLflow server and the Prefect server")


@contextlib.contextmanager
def local_stack(
    home: str | Path | None = None,
    *,
    prefect_port: int = 4200,
    mlflow_port: int = 5000,
    pool: str = "local",
    training_pool: str | None = None,
    workdir: Path = REPO,
    timeout_s: float = 180.0,
    worker_env: Mapping[str, str] | None = None,
) -> Iterator[LocalStack]:
    """Start a Prefect server, an MLflow tracking server and a process worker on 127.0.0.1.

    Args:
        home: where the state lives (see the module docstring); unset: the working directory's
            MLflow store and Prefect's own home.
        prefect_port, mlflow_port: ports on 127.0.0.1.
        pool: the process work pool the worker polls (created if missing).
        training_pool: a second process pool with a worker of its own, standing in for the GPU pool
            that runs training stages with `run.placement: pools` (e.g. "gpu").
        workdir: the checkout flow runs execute in (TUNEGATE_HOME for the worker).
        timeout_s: how long each server may take to answer its health check.
        worker_env: extra environment for the worker and the flow runs it starts.

    Yields:
        The stack's addresses; on exit all three processes are stopped (terminate, wait, kill).

    Raises:
        ServerError: a port in use, or a process that exited or never became healthy.
    """
    base = Path(home).resolve() if home else Path.cwd().resolve()
    logs = base / ".cache" / "stack"
    logs.mkdir(parents=True, exist_ok=True)
    for port in (prefect_port, mlflow_port):
        _check_port_free(port)
    stack = LocalStack(
        prefect_url=f"http://127.0.0.1:{prefect_port}",
        mlflow_url=f"http://127.0.0.1:{mlflow_port}",
        pool=pool,
        workdir=Path(workdir).resolve(),
        logs=logs,
        training_pool=training_pool,
    )
    env = {
        **os.environ,
        "PREFECT_API_URL": stack.api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "MLFLOW_ENABLE_TELEMETRY": "false",
    }
    if home:
        env["PREFECT_HOME"] = str(base / "prefect")
    prefect_cmd = [sys.executable, "-m", "prefect"]
    services: list[Service] = []
    with _sigint_not_ignored():
        try:
            server_cmd = [*prefect_cmd, "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)]
            services.append(Service.start("prefect-server", server_cmd, env, base, logs))
            mlflow_cmd, mlflow_env = mlflow_server(base, mlflow_port, env)
            services.append(Service.start("mlflow-server", mlflow_cmd, mlflow_env, base, logs))
            deadline = time.monotonic() + timeout_s
            services[0].wait_healthy(f"{stack.api_url}/health", deadline)
            services[1].wait_healthy(f"{stack.mlflow_url}/health", deadline)

            run_env = {
                **env,
                "TUNEGATE_HOME": str(stack.workdir),
                "MLFLOW_TRACKING_URI": stack.mlflow_url,
                "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
                "TOKENIZERS_PARALLELISM": "false",
                "PREFECT_RUNNER_AUTO_INSTALL_DEPENDENCIES": "false",  # never pip/uv install at run time
                # a config from the UI form reads data only from here (flows/guards.py)
                "TUNEGATE_DATA_ROOTS": os.environ.get("TUNEGATE_DATA_ROOTS") or str(stack.workdir / "data"),
                **(worker_env or {}),
            }
            workers = [(pool, "worker")] + ([(training_pool, "training-worker")] if training_pool else [])
            for worker_pool, label in workers:
                _ensure_local_pool(stack.api_url, worker_pool)
                name = f"tunegate-{worker_pool}-{prefect_port}"
                worker_cmd = [*prefect_cmd, "worker", "start", "--pool", worker_pool, "--type", "process"]
                worker_cmd += ["--name", name, "--install-policy", "never"]
                started = time.time()
                services.append(Service.start(label, worker_cmd, run_env, stack.workdir, logs))
                deadline = time.monotonic() + timeout_s
                _wait_worker(services[-1], stack.api_url, worker_pool, name, started, deadline)
            yield replace(stack, services=tuple(services))
        finally:
            for service in reversed(services):  # the worker first, while its server still answers
                service.stop()


def mlflow_server(home: Path, port: int, env: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """The command and environment of an MLflow tracking server on 127.0.0.1:`port`, its store
    (`mlflow.db`, `mlartifacts/`) under `home`."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--workers", "1", "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}"]
    cmd += ["--artifacts-destination", str(home / "mlartifacts")]
    # Job execution serves GenAI evaluation jobs: six idle processes that tunegate never uses.
    return cmd, {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_ENABLE_TELEMETRY": "false"}


@dataclass
class Service:
    """One process of the stack (a server or a worker), its output appended to `log`."""

    name: str
    proc: subprocess.Popen
    log: Path

    @classmethod
    def start(cls, name: str, cmd: list[str], env: Mapping[str, str], cwd: Path, logs: Path) -> Service:
        """Start `cmd` in its own session, its output going to `logs/<name>.log`."""
        log = logs / f"{name}.log"
        with open(log, "ab") as out:
            # Its own session: stopping it reaches the server processes it starts in turn.
            proc = subprocess.Popen(
                cmd,
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return cls(name, proc, log)

    def check_alive(self) -> None:
        if (code := self.proc.poll()) is not None:
            raise ServerError(f"{self.name} exited with code {code}; the end of {self.log}:\n{self.tail()}")

    def wait_healthy(self, url: str, deadline: float) -> None:
        while True:
            self.check_alive()
            with contextlib.suppress(urllib.error.URLError, OSError):
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        return
            if time.monotonic() > deadline:
                raise ServerError(
                    f"{self.name} did not answer {url} in time; the end of {self.log}:\n{self.tail()}"
                )
            time.sleep(0.5)

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM to the process group, wait, then SIGKILL whatever is left of the group."""
        pgid = self.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _group_alive(pgid):
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)


@contextlib.contextmanager
def _sigint_not_ignored() -> Iterator[None]:
    """Children inherit an ignored SIGINT (a shell's background job), and Prefect's worker stops
    on SIGTERM by sending itself SIGINT: without this it would never stop."""
    import threading

    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
    ):
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(
            socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
        )  # as the servers bind: TIME_WAIT is no conflict
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise ServerError(
                f"port {port} on 127.0.0.1 is in use (a server already running?): stop it, or pick "
                "another with --prefect-port / --mlflow-port"
            ) from None


def _ensure_local_pool(api_url: str, pool: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        ensure_pool(client, pool)


def _wait_worker(service: Service, api_url: str, pool: str, name: str, since: float, deadline: float) -> None:
    """Until the worker has sent a heartbeat to the server: then runs are picked up."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        while True:
            service.check_alive()
            # limit/offset explicit: prefect 3.8.8's sync client sends null for them, which the server rejects
            workers = client.read_workers_for_work_pool(pool, offset=0, limit=50)
            if any(
                w.name == name and w.last_heartbeat_time and w.last_heartbeat_time.timestamp() >= since - 1
                for w in workers
            ):
                return
            if time.monotonic() > deadline:
                raise ServerError(
                    f"worker {name} did not reach the server; the end of {service.log}:\n{service.tail()}"
                )
            time.sleep(0.5)
