"""The pipeline flow: Prefect wiring only. Stage logic lives in `tasks/`, the stage table in
`flows/stages.py`.

The flow walks the table: each stage runs as a Prefect task inside one MLflow parent run, with a
nested MLflow run of its own (the trainers log their curves there), called with the arguments its
declaration names and cached under the key derived from them. Orchestration policy — names,
retries, caching — sits here.

    base model ─► validate ─► build ─► sft ─► [reward model, judge model] ─► [align] ─► evaluate ─► gates ─► register
                                                 (the judge is never a reward: the guard and win rates only)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.states import Completed

from flows import cache, reporting
from flows.guards import check_data_roots, secrets_from_blocks
from flows.lineage import log_lineage
from flows.placement import check_deployment, placed
from flows.progress import forward_stage_logs, stage_telemetry, watch
from flows.retries import is_transient, retry_transient
from flows.stages import (
    BY_NAME,
    DECIDE,
    PRODUCE,
    Stage,
    call_arguments,
    checkpoint_dir,
    data_content,
    stage_key,
    training_facts,
    waves,
)
from tasks.benchmarks import check_benchmarks
from tasks.gates import apply_stage_gates, data_metrics
from tasks.promotion_lock import promotion_lock, store_setup_lock
from tasks.registry import current_champion, fetch_champion
from tasks.trainer_args import check_trainer_args
from tunegate.artifacts import (
    Artifact,
    GateVerdict,
    InstructionDataset,
    ModelArtifact,
    Registration,
)
from tunegate.config import PipelineConfig
from tunegate.environment import lent_environ
from tunegate.errors import ConfigError, DataValidationError, StageGateFailed, StoreUnavailable
from tunegate.out_of_memory import as_stage_error
from tunegate.provenance import code_version, git_commit, library_versions

log = logging.getLogger(__name__)


def _stage_task(stage: Stage) -> Callable[..., Any]:
    """Wrap a stage as a Prefect task that runs inside a nested MLflow run.

    With `cache_entry` (see `flows/cache.py`) a stored result for the same inputs, whose files still
    match their manifest, is returned without running the stage: the task ends in a `Cached` state and
    its MLflow run points at the run that made the result (`tunegate.cached_from`). Transient failures
    (the stores unreachable, a worker preempted) are retried; bad data, a failed gate, a config error or
    running out of memory never are.
    """
    fn = placed(stage.name) if stage.trains else stage.function()

    def run(*args: Any, parent_run_id: str, cache_entry: str | None = None, **kwargs: Any) -> Any:
        with mlflow.start_run(run_name=stage.name, nested=True, parent_run_id=parent_run_id) as stage_run:
            mlflow.set_tag("tunegate.stage", stage.name)
            if (hit := cache.load(cache_entry)) is not None:
                record, made_by = hit
                mlflow.set_tags({"tunegate.cached": "true", "tunegate.cached_from": made_by or ""})
                reporting.log_record(record)
                return Completed(
                    data=record, name="Cached", message=f"reused the result of MLflow run {made_by}"
                )
            start = time.perf_counter()
            out_dir = kwargs.get("out_dir")
            with watch(stage.name, Path(out_dir) / "progress.json") if out_dir else contextlib.nullcontext():
                try:
                    out = fn(*args, **kwargs)
                except Exception as exc:  # out of memory: never retried, and says what to lower
                    if (mapped := as_stage_error(exc, stage.name)) is not exc:
                        raise mapped from exc
                    raise
            mlflow.log_metric("stage_seconds", time.perf_counter() - start)
            if isinstance(out, Artifact):
                reporting.log_record(out)
                cache.store(cache_entry, out, stage_run.info.run_id)
            return out

    # No functools.wraps: Prefect would bind calls to the stage's own signature, without parent_run_id.
    run.__name__, run.__qualname__, run.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
    stage_task = task(
        name=stage.name,
        retries=2,
        retry_delay_seconds=10,
        retry_condition_fn=retry_transient,
        cache_policy=NO_CACHE,  # tunegate's own content keys: see flows/cache.py
    )(run)

    def call(*args: Any, **kwargs: Any) -> Any:
        # A task that returns a State (our `Cached`) hands the caller that State: unwrap it the same way
        # for every outcome (`result()` raises the stage's own exception on failure).
        return stage_task(*args, return_state=True, **kwargs).result()

    call.task = stage_task
    return call


TASKS = {name: _stage_task(stage) for name, stage in BY_NAME.items()}
# Registration moves aliases under a lock: never cached, never part of the table's walk.
_register_task = _stage_task(
    Stage("register", "tasks.registry:register_candidate", "registration", cached=False)
)


# No log_prints: it patches print(), which breaks dill's stdout capture inside datasets' hashing.
@flow(name="tunegate-pipeline")
def pipeline(config: PipelineConfig) -> dict[str, Any]:
    """Raw data to a registered, promoted model — or a clear reason why not."""
    forward_stage_logs()
    reg = config.registry
    check_data_roots(config)
    # A wrong TRL argument or a benchmark task not found fails now, not after training.
    if problems := check_trainer_args(config) + check_benchmarks(config.evaluate.benchmarks):
        raise ConfigError(problems)
    try:
        with secrets_from_blocks(config.run.secrets) as secret_names, _mlflow_http_limits(reg):
            return _pipeline(config, secret_names)
    except Exception as exc:
        if _tracking_server_unreachable(exc, reg.tracking_uri):
            raise StoreUnavailable(
                f"the MLflow tracking server at {reg.tracking_uri} did not answer ({reg.max_retries} retries "
                f"per request, {reg.timeout_s:g} s timeout): {_first_line(exc)}. Nothing was promoted and no "
                "alias moved; start the server again and rerun: finished stages come from the cache, and "
                "a registration cut short is finished, not repeated"
            ) from exc
        raise


@contextlib.contextmanager
def _mlflow_http_limits(reg) -> Iterator[None]:
    """Bounded, for this run: a tracking server that is down fails the run in seconds, not after
    MLflow's minutes. MLflow reads these settings only from its environment variables; they are
    restored when the run ends."""
    limits = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(reg.max_retries),
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, round(reg.timeout_s))),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": os.environ.get("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "2"),
    }
    with lent_environ(limits):
        yield


def _tracking_server_unreachable(exc: BaseException | None, uri: str) -> bool:
    """A transient failure that names the tracking server (MLflow's errors carry the request URL)."""
    from urllib.parse import urlsplit

    if not uri.startswith(("http://", "https://")):
        return False
    host = urlsplit(uri).netloc
    for _ in range(20):  # the chain of causes, bounded (a chain can loop)
        if exc is None:
            return False
        if is_transient(exc) and host in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _pipeline(config: PipelineConfig, secret_names: list[str]) -> dict[str, Any]:
    """The diagram above: produce a candidate, stop if it is the champion already, judge it, ship it."""
    logger = get_run_logger()
    run_id = flow_run.get_id() or "local"
    run_dir = Path(config.run.output_dir) / f"{time.strftime('%Y%m%d-%H%M%S')}-{str(run_id)[:8]}"
    reg = config.registry
    _use_experiment(reg)
    champion = current_champion(reg)
    data_digest = _data_digest(config)
    with mlflow.start_run(run_name=config.run.name) as parent:
        pid = parent.info.run_id
        commit = git_commit()
        _tag_parent(config, run_id, champion.version if champion else None, run_dir, commit)
        mlflow.set_tags({"tunegate.data_digest": data_digest, "tunegate.code_version": code_version()})
        if secret_names:  # which variables came from Secret blocks; their values go nowhere
            mlflow.set_tag("tunegate.secrets_from_blocks", ",".join(secret_names))
        if config.run.skip_unchanged_data and champion is not None and champion.data_digest == data_digest:
            reason = f"no new data: the raw data is what champion version {champion.version} was trained on"
            return _no_run(config, reason, champion, pid, run_dir, run_id, "no-new-data")
        check_deployment(config.run)
        ctx: dict[str, Any] = {"champion_version": champion.version if champion else None}
        _walk(PRODUCE, config, ctx, pid, run_dir)
        candidate = ctx["candidate"] = ctx.get("aligned") or ctx["sft"]
        if champion is not None and champion.digest == candidate.digest:  # e.g. every stage came from cache
            reason = f"the candidate is champion version {champion.version} already (same weights digest)"
            return _no_run(config, reason, champion, pid, run_dir, run_id, "already-champion")
        ctx["models"] = _models(config, ctx, champion, run_dir)
        _walk(DECIDE, config, ctx, pid, run_dir)
        verdict, report = ctx["verdict"], ctx["report"]
        reporting.log_report(report)
        reporting.publish_verdict(verdict, run_dir / "gates", report)
        # A passing candidate is registered and promoted; a failing one is logged for audit only.
        registration = _register(config, ctx, verdict, champion, pid, run_id, commit, data_digest)
        mlflow.set_tags(
            {
                "tunegate.promoted": str(registration.promoted).lower(),
                "tunegate.registered_version": registration.version or "",
            }
        )
        if registration.version and registration.promoted:
            log_lineage(reg.tracking_uri, f"{reg.model_name}/{registration.version}", pid)
        logger.info("verdict: %s; %s", "PASS" if verdict.passed else "FAIL", registration.reason)
    telemetry = stage_telemetry({s.name: ctx.get(s.output) for s in PRODUCE if s.trains})
    return _result(config, verdict, report, registration, pid, run_dir, run_id, telemetry=telemetry)


def _walk(stages: tuple[Stage, ...], config: PipelineConfig, ctx: dict[str, Any], pid: str, run_dir: Path):
    """Run each stage the config uses, in order, putting its output into `ctx` under its name; with
    `run.parallel_stages`, the stages of a wave (`flows.stages.waves`) train at the same time."""
    code = code_version()
    store = cache.StageCache(Path(config.run.output_dir) / "cache", config.run.cache)
    for wave in waves(stages, config):
        if (threads := _side_by_side(config, len(wave))) is None:  # one by one, each gated at once
            for stage in wave:
                call = _stage_call(stage, config, ctx, pid, run_dir, code, store)
                _finish(stage, config, ctx, _run_stage(stage, run_dir, *call))
            continue
        calls = [_stage_call(stage, config, ctx, pid, run_dir, code, store) for stage in wave]
        for stage, out in zip(wave, _run_together(wave, calls, threads), strict=True):
            _finish(stage, config, ctx, out)


def _finish(stage: Stage, config: PipelineConfig, ctx: dict[str, Any], out: Any) -> None:
    """Put the stage's output into the run's context, then its hook and the gates after it."""
    ctx[stage.output] = out
    AFTER.get(stage.name, _no_hook)(config, ctx)
    if stage.gates and stage.name != "build":
        _stage_gates(config, stage.gates, out.metrics)


def _stage_call(stage: Stage, config: PipelineConfig, ctx, pid: str, run_dir: Path, code: str, store):
    """The arguments the stage's task is called with: its declared ones, and where it writes, caches
    and checkpoints (keyed by the same declaration)."""
    args, kwargs = call_arguments(stage, config, ctx)
    kwargs["parent_run_id"] = pid
    if stage.name not in ("base-model", "reward-backbone", "gates"):
        kwargs["out_dir"] = run_dir / stage.name
    key = stage_key(stage, config, ctx, code)
    if stage.cached:
        kwargs["cache_entry"] = store.entry(stage.name, key)
    if stage.trains:
        kwargs.update(checkpoint_dir=checkpoint_dir(stage, key, config), placement=config.run)
    return args, kwargs


def _run_stage(stage: Stage, run_dir: Path, args: list, kwargs: dict[str, Any]) -> Any:
    try:
        return TASKS[stage.name](*args, **kwargs)
    except DataValidationError:
        reporting.publish_report(run_dir / stage.name / "validation.md", "data-validation")
        raise


def _side_by_side(config: PipelineConfig, n: int) -> int | None:
    """Whether `n` training stages run at once, and the CPU threads each gets where it runs here (0 on
    a pool: each is a flow run on its own worker). None: one after the other (a single stage, the
    setting off, or they would share one local GPU's memory)."""
    if n < 2 or not config.run.parallel_stages:
        return None
    if config.run.placement == "pools":
        return 0
    if training_facts(config)["device"] != "cpu":
        return None
    import torch

    return max(1, torch.get_num_threads() // n)


def _run_together(wave: tuple[Stage, ...], calls: list[tuple[list, dict]], threads: int) -> list[Any]:
    """The wave's stages as Prefect tasks submitted at once (each in a child process of `threads` CPU
    threads when local); waits for all of them, so a failed one never stops the others' results from
    reaching the cache, then raises the first failure in table order."""
    futures = []
    for stage, (args, kwargs) in zip(wave, calls, strict=True):
        if threads:
            kwargs = {**kwargs, "threads": threads}
        futures.append(TASKS[stage.name].task.submit(*args, **kwargs))
    for future in futures:
        future.wait()
    return [future.result() for future in futures]


def _after_base(config: PipelineConfig, ctx: dict[str, Any]) -> None:
    base = ctx["base"]
    mlflow.log_params({"base_model": config.model.base_model, "base_model_digest": base.digest[:16]})
    mlflow.set_tags(
        {"tunegate.base_model": config.model.base_model, "tunegate.base_model_digest": base.digest}
    )


def _after_validate(config: PipelineConfig, ctx: dict[str, Any]) -> None:
    reporting.publish_report(Path(ctx["validated"].report_markdown), "data-validation")


def _after_build(config: PipelineConfig, ctx: dict[str, Any]) -> None:
    reporting.log_datasets(ctx["dataset"], ctx["validated"])
    _stage_gates(config, "data", data_metrics(ctx["validated"], ctx["dataset"]))


def _no_hook(config: PipelineConfig, ctx: dict[str, Any]) -> None:
    return None


AFTER = {"base-model": _after_base, "validate": _after_validate, "build": _after_build}


def _models(config: PipelineConfig, ctx: dict[str, Any], champion, run_dir: Path) -> dict[str, ModelArtifact]:
    """The models evaluation scores side by side on the same rows."""
    models = {"base": ctx["base"], "candidate": ctx["candidate"]}
    if ctx["candidate"] is not ctx["sft"]:  # what alignment added is judged against the SFT model
        models = {"base": ctx["base"], "sft": ctx["sft"], "candidate": ctx["candidate"]}
    if champion is not None:
        reg = config.registry
        path = fetch_champion(reg, champion, run_dir / "champion")
        models["champion"] = ModelArtifact(
            path=str(path),
            role="champion",
            base_model=f"models:/{reg.model_name}/{champion.version}",
            digest=champion.digest or f"{reg.model_name}/{champion.version}",
            trust_remote_code=config.model.trust_remote_code,
        )
    return models


def _data_digest(config: PipelineConfig) -> str:
    """What the data the run's stages read holds, kind by kind, wherever the files live."""
    content = data_content(config.data_needed)
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _result(
    config, verdict, report, registration, pid, run_dir, run_id, outcome=None, telemetry=None
) -> dict[str, Any]:
    """What the flow returns (and `tunegate run` prints a summary of)."""
    result = {
        "verdict": verdict.model_dump(),
        "report": report.model_dump() if report is not None else None,
        "registration": registration.model_dump(),
        "telemetry": telemetry or {},
        "mlflow_run_id": pid,
        "experiment": config.registry.experiment,
        "tracking_uri": config.registry.tracking_uri,
        "run_dir": str(run_dir),
        "flow_run_id": str(run_id),
    }
    return result | ({"outcome": outcome} if outcome else {})


def _register(config, ctx, verdict, champion, pid, run_id, commit, data_digest) -> Registration:
    reg, candidate, base = config.registry, ctx["candidate"], ctx["base"]
    return _register_task(
        reg,
        candidate,
        verdict,
        expected_champion=champion.version if champion else None,
        tags={
            "tunegate.parent_run_id": pid,
            "prefect.flow_run_id": str(run_id),
            "prefect.flow_run_url": _ui_url(),
            "tunegate.config_digest": config.digest(),
            "tunegate.git_commit": commit,
            "tunegate.base_model": config.model.base_model,
            "tunegate.base_model_digest": base.digest,
            "tunegate.candidate_digest": candidate.digest,
            "tunegate.data_digest": data_digest,
            "tunegate.trust_remote_code": str(config.model.trust_remote_code).lower(),
        },
        smoke_prompt=_first_eval_prompt(ctx["dataset"]),
        lock=promotion_lock(reg),
        parent_run_id=pid,
    )


def _no_run(
    config: PipelineConfig, reason: str, champion, pid: str, run_dir: Path, run_id, outcome: str
) -> dict[str, Any]:
    """The result of a run that ends without a decision to make: nothing new to train or to ship."""
    reg = config.registry
    mlflow.set_tags({"tunegate.outcome": outcome, "tunegate.promoted": "false"})
    get_run_logger().info(reason)
    verdict = GateVerdict(passed=False, results=[], markdown=f"## No run: {reason}")
    registration = Registration(
        promoted=False,
        model_name=reg.model_name,
        version=champion.version,
        aliases=[reg.alias],
        reason=reason,
    )
    return _result(config, verdict, None, registration, pid, run_dir, run_id, outcome)


def _ui_url() -> str:
    """The flow run's page in the Prefect UI; empty on the ephemeral API (no UI is serving it)."""
    url = flow_run.get_flow_run_ui_url() or ""
    return "" if url.startswith("None") else url


def _stage_gates(config: PipelineConfig, stage: str, metrics: dict[str, float]) -> None:
    """Decide the gates that sit after `stage`; a failure stops the run here, nothing registered."""
    if not any(g.stage == stage for g in config.gates):
        return
    verdict = apply_stage_gates(config.gates, stage, metrics)
    reporting.publish_verdict(verdict, None)
    if not verdict.passed:
        failed = "; ".join(f"{r.gate}: {r.why}" for r in verdict.results if not r.passed)
        raise StageGateFailed(f"gates after {stage} failed ({failed}); the run stops before the next stage")


def _first_eval_prompt(dataset: InstructionDataset) -> list[dict]:
    import pyarrow.parquet as pq

    rows = pq.read_table(dataset.splits["eval"].path, columns=["prompt"]).slice(0, 1).to_pylist()
    return rows[0]["prompt"] if rows else [{"role": "user", "content": "Hello!"}]


def _use_experiment(reg) -> None:
    with store_setup_lock(reg):
        _set_experiment(reg)


def _set_experiment(reg) -> None:
    mlflow.set_tracking_uri(reg.tracking_uri)
    if reg.artifact_root and mlflow.get_experiment_by_name(reg.experiment) is None:
        try:
            mlflow.create_experiment(reg.experiment, artifact_location=reg.artifact_root)
        except mlflow.exceptions.MlflowException as exc:  # another run created it first: fine
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    mlflow.set_experiment(reg.experiment)


def _tag_parent(
    config: PipelineConfig, run_id: str, champion: str | None, run_dir: Path, commit: str
) -> None:
    mlflow.set_tags(
        {
            "tunegate.git_commit": commit,
            **{f"tunegate.version.{name}": v for name, v in library_versions().items()},
            "prefect.flow_run_id": str(run_id),
            "prefect.flow_run_name": flow_run.get_name() or "",
            "prefect.flow_run_url": _ui_url(),
            "tunegate.config_digest": config.digest(),
            "tunegate.champion_at_start": champion or "none",
            "tunegate.run_dir": str(run_dir),
            "tunegate.trust_remote_code": str(config.model.trust_remote_code).lower(),
        }
    )
    mlflow.log_dict(config.model_dump(mode="json", by_alias=True), "config/resolved.json")
    mlflow.log_param("config_digest", config.digest())
