"""Deployments: register what `deployments/prefect.yaml` says with a Prefect server.

`deploy` registers the deployments (names, queue, limits, schedule), their work pools and queues,
filling the run form's defaults from a preset. The local stack that `tunegate up` starts to deploy
to is flows/stack.py.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
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
                ensure_pool(client, name)
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


def ensure_pool(client, name: str) -> None:
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
