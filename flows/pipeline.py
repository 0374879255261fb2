"""The pipeline flow: Prefect wiring only. Stage logic lives in `tasks/`.

Every stage runs as a Prefect task inside one MLflow parent run, with a nested MLflow run of its own
(the trainers log their curves there). Orchestration policy — names, retries, caching — sits here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.states import Completed

from flows import cache
from flows.guards import allow_remote_code, check_data_roots, secrets_from_blocks
from flows.lineage import log_lineage
from flows.locks import promotion_lock
from flows.placement import check_deployment, placed
from flows.retries import is_transient, retry_transient
from tasks.base_model import prepare_base_model
from tasks.build import build_datasets
from tasks.evaluate import evaluate_models
from tasks.gates import apply_gates, apply_stage_gates, data_metrics, verdict_chart
from tasks.registry import current_champion, fetch_champion, register_candidate, store_setup_lock
from tasks.validate import validate_data
from tunegate.artifacts import (
    Artifact,
    GateVerdict,
    InstructionDataset,
    Registration,
    ValidatedData,
    sha256_file,
)
from tunegate.config import PipelineConfig
from tunegate.errors import DataValidationError, StageGateFailed, StoreUnavailable
from tunegate.provenance import code_version, git_commit, library_versions

log = logging.getLogger(__name__)


def _stage(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a stage function as a Prefect task that runs inside a nested MLflow run.

    With `cache_entry` (see `flows/cache.py`) a stored result for the same inputs is returned without
    running the stage: the task ends in a `Cached` state and its MLflow run points at the run that
    made the result (`tunegate.cached_from`). Transient failures (the stores unreachable, a worker
    preempted) are retried; bad data, a failed gate or a config error never are.
    """

    def run(*args: Any, parent_run_id: str, cache_entry: str | None = None, **kwargs: Any) -> Any:
        with mlflow.start_run(run_name=name, nested=True, parent_run_id=parent_run_id) as stage_run:
            mlflow.set_tag("tunegate.stage", name)
            if (hit := cache.load(cache_entry)) is not None:
                record, made_by = hit
                mlflow.set_tags({"tunegate.cached": "true", "tunegate.cached_from": made_by or ""})
                _log_record(record)
                return Completed(
                    data=record, name="Cached", message=f"reused the result of MLflow run {made_by}"
                )
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            mlflow.log_metric("stage_seconds", time.perf_counter() - start)
            if isinstance(out, Artifact):
                _log_record(out)
                cache.store(cache_entry, out, stage_run.info.run_id)
            return out

    # No functools.wraps: Prefect would bind calls to the stage's own signature, without parent_run_id.
    run.__name__, run.__qualname__, run.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
    stage_task = task(
        name=name,
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


prepare_base_model_task = _stage("base-model", prepare_base_model)
validate_task = _stage("validate", validate_data)
build_task = _stage("build", build_datasets)
sft_task = _stage("sft", placed("sft"))
reward_task = _stage("reward-model", placed("reward-model"))
align_task = _stage("align", placed("align"))
evaluate_task = _stage("evaluate", evaluate_models)
gates_task = _stage("gates", apply_gates)
register_task = _stage("register", register_candidate)


# No log_prints: it patches print(), which breaks dill's stdout capture inside datasets' hashing.
@flow(name="tunegate-pipeline")
def pipeline(config: PipelineConfig) -> dict[str, Any]:
    """Raw data to a registered, promoted model — or a clear reason why not."""
    reg = config.registry
    # Bounded: a tracking server that is down fails the run in seconds, not after MLflow's minutes.
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(reg.max_retries)
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, round(reg.timeout_s)))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "2")
    allow_remote_code(config)
    check_data_roots(config)
    try:
        with secrets_from_blocks(config.run.secrets) as secret_names:
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
    logger = get_run_logger()
    run_id = flow_run.get_id() or "local"
    run_dir = Path(config.run.output_dir) / f"{time.strftime('%Y%m%d-%H%M%S')}-{str(run_id)[:8]}"
    reg = config.registry
    _use_experiment(reg)
    champion = current_champion(reg)
    files = _raw_files(config)
    raw = cache.file_digests([p for paths in files.values() for p in paths])
    # What the data holds, kind by kind, wherever the files live: moving them is not new data.
    by_kind = {kind: [raw[str(p)] for p in paths] for kind, paths in files.items()}
    data_digest = hashlib.sha256(json.dumps(by_kind, sort_keys=True).encode()).hexdigest()
    stages = cache.StageCache(Path(config.run.output_dir) / "cache", code_version(), config.run.cache)
    with mlflow.start_run(run_name=config.run.name) as parent:
        pid = parent.info.run_id
        commit = git_commit()
        _tag_parent(config, run_id, champion.version if champion else None, run_dir, commit)
        mlflow.set_tags({"tunegate.data_digest": data_digest, "tunegate.code_version": code_version()})
        if secret_names:  # which variables came from Secret blocks; their values go nowhere
            mlflow.set_tag("tunegate.secrets_from_blocks", ",".join(secret_names))
        if config.run.skip_unchanged_data and champion is not None and champion.data_digest == data_digest:
            reason = f"no new data: the raw data is what champion version {champion.version} was trained on"
            mlflow.set_tags({"tunegate.outcome": "no-new-data", "tunegate.promoted": "false"})
            logger.info(reason)
            return _no_run(config, reason, champion, pid, run_dir, run_id, "no-new-data")
        check_deployment(config.run)
        base = prepare_base_model_task(config.model, parent_run_id=pid)
        mlflow.log_params({"base_model": config.model.base_model, "base_model_digest": base.digest[:16]})
        mlflow.set_tags(
            {"tunegate.base_model": config.model.base_model, "tunegate.base_model_digest": base.digest}
        )
        try:
            validated = validate_task(
                config.validate_,
                config.data,
                base,
                out_dir=run_dir / "validate",
                system_prompt=config.model.system_prompt,
                parent_run_id=pid,
                cache_entry=stages.entry(
                    "validate", config.validate_, raw, base.digest, config.model.system_prompt
                ),
            )
        except DataValidationError:
            _publish_report(run_dir / "validate" / "validation.md", "data-validation")
            raise
        _publish_report(Path(validated.report_markdown), "data-validation")
        dataset = build_task(
            config.build,
            validated,
            out_dir=run_dir / "dataset",
            seed=config.run.seed,
            parent_run_id=pid,
            cache_entry=stages.entry("build", config.build, validated, config.run.seed),
        )
        _log_datasets(dataset, validated)
        _stage_gates(config, "data", data_metrics(validated, dataset))
        seed = config.run.seed
        # where the training stages run: here, or as flow runs on the GPU pool (flows/placement.py)
        launch = {
            "gpus": config.run.gpus,
            "accelerate_config": config.run.accelerate_config,
            "placement": config.run,
        }
        ckpt = _checkpoint_dirs(config, dataset, base)
        sft = sft_task(
            config.sft,
            dataset,
            base,
            out_dir=run_dir / "sft",
            seed=seed,
            checkpoint_dir=ckpt("sft", base.digest),
            **launch,
            parent_run_id=pid,
            cache_entry=stages.entry("sft", config.sft, dataset, base.digest, seed),
        )
        _stage_gates(config, "sft", sft.metrics)
        reward = None
        if config.uses_reward_model:
            backbone = sft
            if config.reward.backbone:
                backbone = prepare_base_model_task(
                    config.model.model_copy(update={"base_model": config.reward.backbone}), parent_run_id=pid
                )
            reward = reward_task(
                config.reward,
                dataset,
                backbone,
                out_dir=run_dir / "reward",
                seed=seed,
                checkpoint_dir=ckpt("reward", backbone.digest),
                **launch,
                parent_run_id=pid,
                cache_entry=stages.entry("reward", config.reward, dataset, backbone.digest, seed),
            )
            _stage_gates(config, "reward", reward.metrics)
        candidate = align_task(
            config.align,
            dataset,
            sft,
            reward,
            out_dir=run_dir / "align",
            seed=seed,
            checkpoint_dir=ckpt("align", sft.digest, reward.digest if reward else ""),
            **launch,
            parent_run_id=pid,
            cache_entry=stages.entry(
                "align", config.align, dataset, sft.digest, reward and reward.digest, seed
            ),
        )
        if champion is not None and champion.digest == candidate.digest:  # e.g. every stage came from cache
            reason = f"the candidate is champion version {champion.version} already (same weights digest)"
            mlflow.set_tags({"tunegate.outcome": "already-champion", "tunegate.promoted": "false"})
            logger.info(reason)
            return _no_run(config, reason, champion, pid, run_dir, run_id, "already-champion")
        models = {"base": base.path, "candidate": candidate.path}
        digests = {"base": base.digest, "candidate": candidate.digest}
        if champion is not None:
            models["champion"] = str(fetch_champion(reg, champion, run_dir / "champion"))
            digests["champion"] = champion.digest or f"{reg.model_name}/{champion.version}"
        report = evaluate_task(
            config.evaluate,
            dataset,
            models,
            reward,
            out_dir=run_dir / "evaluate",
            seed=seed,
            champion_version=champion.version if champion else None,
            parent_run_id=pid,
            cache_entry=stages.entry(
                "evaluate", config.evaluate, dataset, digests, reward and reward.digest, seed
            ),
        )
        verdict = gates_task(config.gates, report, parent_run_id=pid)
        _log_report(report)
        _publish_verdict(verdict, run_dir / "gates")
        # A passing candidate is registered and promoted; a failing one is logged for audit only.
        registration = _register(
            config, candidate, verdict, champion, base, dataset, pid, run_id, commit, data_digest
        )
        mlflow.set_tags(
            {
                "tunegate.promoted": str(registration.promoted).lower(),
                "tunegate.registered_version": registration.version or "",
            }
        )
        if registration.version and registration.promoted:
            log_lineage(reg.tracking_uri, f"{reg.model_name}/{registration.version}", pid)
        logger.info("verdict: %s; %s", "PASS" if verdict.passed else "FAIL", registration.reason)
    return _result(config, verdict, report, registration, pid, run_dir, run_id)


def _result(config, verdict, report, registration, pid, run_dir, run_id, outcome=None) -> dict[str, Any]:
    """What the flow returns (and `tunegate run` prints a summary of)."""
    result = {
        "verdict": verdict.model_dump(),
        "report": report.model_dump() if report is not None else None,
        "registration": registration.model_dump(),
        "mlflow_run_id": pid,
        "experiment": config.registry.experiment,
        "tracking_uri": config.registry.tracking_uri,
        "run_dir": str(run_dir),
        "flow_run_id": str(run_id),
    }
    return result | ({"outcome": outcome} if outcome else {})


def _register(config, candidate, verdict, champion, base, dataset, pid, run_id, commit, data_digest):
    reg = config.registry
    return register_task(
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
        smoke_prompt=_first_eval_prompt(dataset),
        lock=promotion_lock(reg),
        parent_run_id=pid,
    )


def _no_run(
    config: PipelineConfig, reason: str, champion, pid: str, run_dir: Path, run_id, outcome: str
) -> dict[str, Any]:
    """The result of a run that ends without a decision to make: nothing new to train or to ship."""
    reg = config.registry
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


def _raw_files(config: PipelineConfig) -> dict[str, list[Path]]:
    from data_checks.readers import resolve_paths

    return {
        kind: resolve_paths(getattr(config.data, kind)) for kind in ("sft", "preferences", "prompts", "eval")
    }


def _stage_gates(config: PipelineConfig, stage: str, metrics: dict[str, float]) -> None:
    """Decide the gates that sit after `stage`; a failure stops the run here, nothing registered."""
    if not any(g.stage == stage for g in config.gates):
        return
    verdict = apply_stage_gates(config.gates, stage, metrics)
    _publish_verdict(verdict, None)
    if not verdict.passed:
        failed = "; ".join(f"{r.gate}: {r.why}" for r in verdict.results if not r.passed)
        raise StageGateFailed(f"gates after {stage} failed ({failed}); the run stops before the next stage")


def _publish_verdict(verdict: GateVerdict, out_dir: Path | None) -> None:
    """The verdict as a Prefect markdown and table artifact, and in MLflow as markdown, JSON and a PNG chart."""
    import tempfile

    key = "gate-verdict" if verdict.stage == "final" else f"gate-verdict-{verdict.stage}"
    name = "gates" if verdict.stage == "final" else f"gates-{verdict.stage}"
    create_markdown_artifact(
        key=key, markdown=verdict.markdown, description=f"Gate verdict ({verdict.stage})"
    )
    create_table_artifact(
        key=f"{key}-table",
        table=[
            {
                "gate": r.gate,
                "value": r.value,
                "interval": r.interval,
                "n": r.n,
                "baseline": r.reference if r.reference_value is not None else None,
                "baseline_value": r.reference_value,
                "required": r.required,
                "decided_on": r.decided_on,
                "passed": r.passed,
                "why": r.why,
            }
            for r in verdict.results
        ],
        description=f"Gate results ({verdict.stage})",
    )
    mlflow.log_text(verdict.markdown, f"{name}.md")
    mlflow.log_dict(verdict.model_dump(mode="json"), f"{name}.json")
    with tempfile.TemporaryDirectory() as tmp:
        chart = verdict_chart(verdict, (out_dir or Path(tmp)) / f"{name}.png")
        mlflow.log_artifact(str(chart))


def _log_report(report) -> None:
    for label, scores in report.scores.items():
        mlflow.log_metrics({f"{label}.{k}": v for k, v in scores.items()})
        for metric, (lo, hi) in report.intervals.get(label, {}).items():
            mlflow.log_metrics({f"{label}.{metric}.ci_low": lo, f"{label}.{metric}.ci_high": hi})
    for path in (report.samples_path, report.per_row_path):
        if path and Path(path).exists():
            mlflow.log_artifact(path, "evaluation")


def _checkpoint_dirs(config: PipelineConfig, dataset: InstructionDataset, base) -> Callable[..., Path]:
    """Where a training stage keeps its checkpoints: keyed by everything that decides its result (its
    config section, the seed, the built data, the models it starts from), so a run started again
    with the same inputs finds and resumes them, and a changed input never resumes stale ones."""
    data_digest = sha256_file(dataset.manifest)
    sections = {"sft": config.sft, "reward": config.reward, "align": config.align}

    def directory(stage: str, *model_digests: str) -> Path:
        key = json.dumps(
            [
                sections[stage].model_dump(mode="json"),
                config.run.seed,
                data_digest,
                base.digest,
                *model_digests,
            ],
            sort_keys=True,
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        return Path(config.run.output_dir) / "checkpoints" / f"{stage}-{digest}"

    return directory


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


def _log_record(record: Artifact) -> None:
    data = record.model_dump(mode="json")
    mlflow.log_dict(data, "record.json")
    metrics = data.get("metrics")
    if isinstance(metrics, dict):
        mlflow.log_metrics({f"final.{k}": v for k, v in metrics.items()})


def _log_datasets(dataset: InstructionDataset, validated: ValidatedData) -> None:
    """Each split as an MLflow dataset input (source, digest, schema, row count) without loading it
    whole, plus the raw sources' digests, the build manifest and every dropped row with its reason."""
    import warnings

    import pyarrow.parquet as pq
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    for name, f in dataset.splits.items():
        parquet = pq.ParquetFile(f.path)
        head = next(parquet.iter_batches(batch_size=100), None)
        head = (head if head is not None else parquet.schema_arrow.empty_table()).to_pandas()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "can be interpreted in multiple ways": a local file either way
            source = resolve_dataset_source(str(Path(f.path).resolve()))
        ds = MetaDataset(source, name=name, digest=f.sha256[:16], schema=mlflow.data.from_pandas(head).schema)
        context = "eval" if name in ("sft_eval", "pref_eval", "eval") else "train"
        tags = {"rows": str(f.rows), "sha256": f.sha256, "validation_report": "validation/validation.json"}
        mlflow.log_input(ds, context=context, tags=tags)
    mlflow.log_dict(validated.sources, "data/sources.json")
    mlflow.log_artifact(dataset.manifest, "data")
    dropped = Path(dataset.manifest).with_name("dropped.jsonl")
    if dropped.exists():
        mlflow.log_artifact(str(dropped), "data")


def _publish_report(path: Path, key: str) -> None:
    if path.exists():
        text = path.read_text(encoding="utf-8")
        create_markdown_artifact(key=key, markdown=text, description="Data validation report")
        mlflow.log_text(text, "validation/validation.md")
        json_path = path.with_suffix(".json")
        if json_path.exists():
            mlflow.log_dict(json.loads(json_path.read_text()), "validation/validation.json")
