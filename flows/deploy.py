"""Deployments and the local stack.

`deploy` registers what `deployments/prefect.yaml` says (names, queue, limits, schedule) with a
Prefect server, filling the run form's defaults from a preset. `local_stack` (behind `tunegate up`)
starts a Prefect server, an MLflow tracking server and a process worker on 127.0.0.1, and stops
all three on exit.

Where the stack keeps its state: with `home` unset, the working directory's `mlflow.db` and
`mlartifacts/` (the store `tunegate run` writes by default) and Prefect's own home (`~/.prefect`,
the database the ephemeral API writes), so both UIs also show runs made without the stack. With
`home` set, everything (Prefect's database included) lives under it: an isolated stack.
"""

from __future__ import annotations

import contextlib
import json
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
from typing import TYPE_CHECKING, Any

import yaml

from tunegate.config import load_config
from tunegate.errors import ConfigError, TunegateError

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

REPO = Path(__file__).resolve().parents[1]
PREFECT_FILE = REPO / "deployments" / "prefect.yaml"
DEFAULT_PRESET = REPO / "configs" / "demo.yaml"
# The flow whose run form is drawn from PipelineConfig: its deployments get a preset as defaults.
PIPELINE_ENTRYPOINT = "flows/pipeline.py:pipeline"
# name: (worker type, base job template file under deployments/)
GPU_POOLS = {
    "k8s-gpu": ("kubernetes", "k8s-gpu-job-template.json"),
    "docker-gpu": ("docker", "docker-gpu-job-template.json"),
}
_DEPLOYMENT_KEYS = {
    "name",
    "description",
    "entrypoint",
    "tags",
    "parameters",
    "work_pool",
    "concurrency_limit",
    "schedules",
}
_SCHEDULE_KEYS = {"cron", "timezone", "slug", "active"}
_HOME_STEP = {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $TUNEGATE_HOME }}"}}


class ServerError(TunegateError):
    """A server could not be started or reached: a port in use, a process that exited, no answer."""


@dataclass(frozen=True)
class DeploymentSpec:
    """One deployment of prefect.yaml, as `deploy` registers it."""

    name: str
    description: str
    entrypoint: str
    tags: list[str]
    work_pool: str
    work_queue: str | None
    job_variables: dict[str, Any]
    concurrency_limit: int
    collision_strategy: str
    schedules: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)  # parameters.config: laid over the preset


def read_prefect_file(path: Path = PREFECT_FILE) -> list[DeploymentSpec]:
    """The deployments in `path`, checked for what `deploy` can register faithfully.

    Raises:
        ConfigError: listing every key `deploy` would otherwise ignore or could not honour.
    """
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    problems = []
    if raw.get("pull") != [_HOME_STEP]:
        problems.append(
            "pull: tunegate deploy runs flows in the checkout named by TUNEGATE_HOME; keep the single "
            "set_working_directory step with directory '{{ $TUNEGATE_HOME }}'"
        )
    specs = []
    for i, item in enumerate(raw.get("deployments") or []):
        where = f"deployments[{i}] ({item.get('name', '?')})"
        if unknown := sorted(set(item) - _DEPLOYMENT_KEYS):
            problems.append(f"{where}: keys tunegate deploy does not register: {', '.join(unknown)}")
        limit = item.get("concurrency_limit")
        limit = limit if isinstance(limit, dict) else {"limit": limit}
        if not isinstance(limit.get("limit"), int):
            problems.append(f"{where}: concurrency_limit must be set (an integer, or limit: N)")
        for s in item.get("schedules") or []:
            if "cron" not in s or set(s) - _SCHEDULE_KEYS:
                problems.append(f"{where}: schedules take cron with {', '.join(sorted(_SCHEDULE_KEYS))}")
        pool = item.get("work_pool") or {}
        if not (item.get("name") and item.get("entrypoint") and pool.get("name")):
            problems.append(f"{where}: name, entrypoint and work_pool.name are required")
        specs.append(
            DeploymentSpec(
                name=item.get("name", ""),
                description=item.get("description", ""),
                entrypoint=item.get("entrypoint", ""),
                tags=list(item.get("tags") or []),
                work_pool=pool.get("name", ""),
                work_queue=pool.get("work_queue_name"),
                job_variables=dict(pool.get("job_variables") or {}),
                concurrency_limit=limit.get("limit") or 0,
                collision_strategy=limit.get("collision_strategy", "ENQUEUE"),
                schedules=list(item.get("schedules") or []),
                config=dict((item.get("parameters") or {}).get("config") or {}),
            )
        )
    if not specs:
        problems.append("no deployments")
    if problems:
        raise ConfigError(problems, str(path))
    return specs


def deploy(
    api_url: str | None = None,
    preset: str | Path = DEFAULT_PRESET,
    overrides: list[str] | None = None,
    *,
    pool: str | None = None,
    training_pool: str | None = None,
    timezone: str | None = None,
    gpu_pools: bool = False,
    home: str | Path | None = None,
    prefect_file: Path = PREFECT_FILE,
) -> dict[str, str]:
    """Register the deployments of `prefect_file`, their work pool, queue and limits.

    Args:
        api_url: Prefect API, e.g. http://127.0.0.1:4200/api; unset: PREFECT_API_URL.
        preset: YAML preset whose resolved config becomes the deployments' default parameters.
        overrides: dotted overrides applied to the preset, e.g. registry.tracking_uri=http://...
        pool: work pool for the pipeline's deployments instead of the one the file names.
        training_pool: work pool for the training-stage deployment (`run.placement: pools`), e.g.
            k8s-gpu, instead of the one the file names.
        timezone: IANA timezone for the cron schedules instead of the file's.
        gpu_pools: also create (or update) the Kubernetes and Docker GPU pools from their templates.
        home: the checkout runs execute in; unset: $TUNEGATE_HOME, else this repository.
        prefect_file: the deployments file.

    Returns:
        Full deployment name (flow/deployment) -> deployment id.

    Raises:
        ConfigError: an invalid preset or deployments file, or no Prefect API configured.
        ServerError: the Prefect API does not answer.
    """
    from prefect.client.orchestration import get_client

    cfg = load_config(preset, overrides)
    specs = read_prefect_file(prefect_file)
    home = Path(home or os.environ.get("TUNEGATE_HOME") or REPO).resolve()
    preset_config = cfg.model_dump(mode="json", by_alias=True)
    with _prefect_api(api_url):
        with get_client(sync_client=True) as client:
            if (exc := client.api_healthcheck()) is not None:
                raise ServerError(
                    f"the Prefect API at {client.api_url} does not answer ({exc}): is `tunegate up` running?"
                )
            pools = {_pool(s, pool, training_pool) for s in specs} | (set(GPU_POOLS) if gpu_pools else set())
            for name in sorted(pools):
                _ensure_pool(client, name)
            for s in specs:
                if s.work_queue:
                    _ensure_queue(client, _pool(s, pool, training_pool), s.work_queue)
            # The flow serialises promotions through this limit when the tracking store is remote.
            client.upsert_global_concurrency_limit_by_name(f"tunegate-promote-{cfg.registry.model_name}", 1)
        runners = [
            _runner_deployment(
                s, home, _parameters(preset_config, s), _pool(s, pool, training_pool), timezone
            )
            for s in specs
        ]
        return {runner.full_name: str(runner.apply()) for runner in runners}


def _pool(spec: DeploymentSpec, pool: str | None, training_pool: str | None) -> str:
    chosen = pool if spec.entrypoint == PIPELINE_ENTRYPOINT else training_pool
    return chosen or spec.work_pool


def _parameters(preset: dict[str, Any], spec: DeploymentSpec) -> dict[str, Any]:
    """The pipeline's deployments: the run config, defaults from the preset. The training-stage
    deployment takes what the pipeline passes at run time; it has no defaults."""
    if spec.entrypoint != PIPELINE_ENTRYPOINT:
        return {}
    return {"config": _deployment_config(preset, spec)}


def _deployment_config(preset: dict[str, Any], spec: DeploymentSpec) -> dict[str, Any]:
    """The preset with the deployment's own `parameters.config` laid over it (e.g. the nightly
    retrain's `run.skip_unchanged_data`), validated as a whole."""
    from tunegate.config import PipelineConfig

    def merge(base: dict, over: dict) -> dict:
        out = dict(base)
        for k, v in over.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    merged = merge(preset, spec.config)
    try:
        PipelineConfig.model_validate(merged)
    except ValueError as exc:
        raise ConfigError([f"deployment {spec.name}: parameters.config: {exc}"]) from exc
    return merged


def _runner_deployment(
    spec: DeploymentSpec, home: Path, params: dict, pool: str, timezone: str | None
) -> RunnerDeployment:
    """The deployment as Prefect's RunnerDeployment: code in `home`, run there (a local pull step)."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig
    from prefect.deployments.runner import RunnerDeployment
    from prefect.runner.storage import LocalStorage
    from prefect.schedules import Cron

    schedules = [
        Cron(
            c["cron"],
            timezone=timezone or c.get("timezone"),
            slug=c.get("slug"),
            active=c.get("active", True),
        )
        for c in spec.schedules
    ]
    return RunnerDeployment.from_storage(
        storage=LocalStorage(str(home)),
        entrypoint=spec.entrypoint,
        name=spec.name,
        description=spec.description,
        tags=spec.tags,
        parameters=params,
        schedules=schedules,
        concurrency_limit=ConcurrencyLimitConfig(
            limit=spec.concurrency_limit, collision_strategy=spec.collision_strategy
        ),
        work_pool_name=pool,
        work_queue_name=spec.work_queue,
        job_variables=spec.job_variables,
        enforce_parameter_schema=True,
    )


def _ensure_pool(client, name: str) -> None:
    """A GPU pool from its template (updated to it if it exists); any other name: a process pool
    created if missing (an existing pool of any type is left as it is)."""
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    if name in GPU_POOLS:
        kind, template_file = GPU_POOLS[name]
        template = json.loads((REPO / "deployments" / template_file).read_text(encoding="utf-8"))
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type=kind, base_job_template=template))
        else:
            client.update_work_pool(name, WorkPoolUpdate(base_job_template=template))
        return
    try:
        client.read_work_pool(name)
    except ObjectNotFound:
        from prefect.workers.process import ProcessWorker

        client.create_work_pool(
            WorkPoolCreate(
                name=name,
                type="process",
                base_job_template=ProcessWorker.get_default_base_job_template(),
                description="tunegate: flow runs as local processes (tunegate up starts a worker)",
            )
        )


def _ensure_queue(client, pool: str, queue: str) -> None:
    """The shared training queue: one run at a time across every deployment that uses it."""
    from prefect.exceptions import ObjectNotFound

    try:
        existing = client.read_work_queue_by_name(queue, work_pool_name=pool)
    except ObjectNotFound:
        client.create_work_queue(name=queue, work_pool_name=pool, concurrency_limit=1)
    else:
        if existing.concurrency_limit != 1:
            client.update_work_queue(existing.id, concurrency_limit=1)


@contextlib.contextmanager
def _prefect_api(api_url: str | None) -> Iterator[None]:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if api_url:
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            yield
        return
    if not PREFECT_API_URL.value():
        raise ConfigError(
            [
                "no Prefect server to deploy to: start one with `tunegate up` and pass "
                "--api-url http://127.0.0.1:4200/api (or set PREFECT_API_URL)"
            ]
        )
    yield


# --- the local stack -------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalStack:
    """Addresses of a running local stack."""

    prefect_url: str
    mlflow_url: str
    pool: str
    workdir: Path
    logs: Path
    training_pool: str | None = None
    services: tuple[_Service, ...] = field(default=(), repr=False)

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
    services: list[_Service] = []
    with _sigint_not_ignored():
        try:
            server_cmd = [*prefect_cmd, "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)]
            services.append(_Service.start("prefect-server", server_cmd, env, base, logs))
            mlflow_cmd, mlflow_env = mlflow_server(base, mlflow_port, env)
            services.append(_Service.start("mlflow-server", mlflow_cmd, mlflow_env, base, logs))
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
                services.append(_Service.start(label, worker_cmd, run_env, stack.workdir, logs))
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
class _Service:
    name: str
    proc: subprocess.Popen
    log: Path

    @classmethod
    def start(cls, name: str, cmd: list[str], env: Mapping[str, str], cwd: Path, logs: Path) -> _Service:
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
        _ensure_pool(client, pool)


def _wait_worker(
    service: _Service, api_url: str, pool: str, name: str, since: float, deadline: float
) -> None:
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
