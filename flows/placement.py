"""Where the training stages run: in the pipeline's process, or on a work pool of their own.

With `run.placement: local` (the default) a training stage runs where the pipeline runs. With
`run.placement: pools` the pipeline publishes the stage's inputs (the built splits, the models it
starts from) to `run.artifact_root`, starts a flow run of `run.training_deployment` (the
`tunegate-train-stage` flow, deployed on the GPU pool) with `run_deployment`, waits for it, and
fetches the model it published. In the Prefect UI that flow run is nested under the pipeline's task.

    pipeline (CPU pool)                           train-stage (GPU pool)
      publish inputs ──► <artifact_root>/data/<sha256>/..., models/<digest>/...
      run_deployment ──────────────────────────►  fetch inputs (digests checked)
                                                   train (in process, or accelerate launch)
                                                   publish the model, write results/<id>.json
      fetch the model ◄── <artifact_root>/models/<digest>/...

A stage's error comes back as its own type (a config error or a failed training is not retried); a
worker that crashed or was preempted is a transient failure, which the pipeline's stage retries.
The trainers log to the stage's MLflow run, so the tracking URI must be one both sides reach.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.progress import forward_stage_logs
from tasks.launch import STAGES, launched
from tunegate import errors
from tunegate.artifact_store import ArtifactStore
from tunegate.artifacts import InstructionDataset, ModelArtifact
from tunegate.config import RunSection
from tunegate.out_of_memory import as_stage_error

log = logging.getLogger(__name__)

TRAIN_FLOW = "tunegate-train-stage"


class WorkerLost(ConnectionError):
    """The training stage's flow run crashed without a result: its worker died or was preempted.
    A ConnectionError, so the pipeline's stage retries it (see flows/retries.py)."""


def placed(stage: str) -> Callable[..., ModelArtifact]:
    """`tasks.launch.launched(stage)`, taking one more keyword, `placement` (the run section)."""
    local = launched(stage)

    def run(*args: Any, placement: RunSection | None = None, **kwargs: Any) -> ModelArtifact:
        if placement is None or placement.placement == "local":
            return local(*args, **kwargs)
        return on_pool(stage, placement, args, kwargs)

    run.__name__, run.__qualname__, run.__doc__ = local.__name__, local.__qualname__, local.__doc__
    return run


def on_pool(stage: str, run: RunSection, args: tuple, kwargs: dict[str, Any]) -> ModelArtifact:
    """Run `stage` as a flow run of `run.training_deployment`; return its model, fetched here.

    Raises:
        the stage's own error type (ConfigError, TrainingError, StageGateFailed);
        WorkerLost when the flow run crashed; TrainingError when it ended otherwise without a
        result, or did not finish within `run.stage_timeout_s` (it is then cancelled).
    """
    import mlflow
    from prefect.deployments import run_deployment

    store = ArtifactStore(run.artifact_root)
    checkpoint_dir = kwargs.get("checkpoint_dir")
    spec = {
        "args": [store.publish(a).model_dump(mode="json") if _is_record(a) else _dump(a) for a in args],
        "seed": kwargs["seed"],
        "gpus": kwargs.get("gpus", 1),
        "accelerate_config": kwargs.get("accelerate_config"),
        # content-keyed (see flows/pipeline.py): a stage started again on the same volume resumes
        "checkpoint_name": Path(checkpoint_dir).name if checkpoint_dir else None,
    }
    active = mlflow.active_run()
    tracking = {"tracking_uri": mlflow.get_tracking_uri(), "run_id": active.info.run_id} if active else None
    token = uuid.uuid4().hex
    result = f"{stage}-{token}.json"
    flow_run = run_deployment(
        run.training_deployment,
        parameters={
            "stage": stage,
            "spec": spec,
            "artifact_root": run.artifact_root,
            "result": result,
            "mlflow_run": tracking,
        },
        flow_run_name=f"{stage}-{token[:8]}",
        timeout=run.stage_timeout_s,
        poll_interval=2,
    )
    state = flow_run.state
    outcome = store.get_json(result)
    where = f"{stage}: flow run {flow_run.name} ({flow_run.id}) of {run.training_deployment}"
    if outcome is not None and "error" in outcome:
        raise errors.from_outcome(outcome)
    if state is None or not state.is_final():
        _cancel(flow_run.id)
        raise errors.TrainingError(f"{where} did not finish within {run.stage_timeout_s} s; cancelled it")
    if state.is_crashed():
        raise WorkerLost(f"{where} crashed (worker lost or preempted): {state.message}")
    if outcome is None or not state.is_completed():
        raise errors.TrainingError(f"{where} ended {state.name} without a result: {state.message}")
    model = ModelArtifact.model_validate(outcome["artifact"])
    fetched = store.fetch(model, Path(run.output_dir) / "fetched")
    store.remove_json(result)
    log.info("%s: fetched %s from %s", where, fetched.path, model.path)
    return fetched


@flow(name=TRAIN_FLOW)
def train_stage(
    stage: str,
    spec: dict[str, Any],
    artifact_root: str,
    result: str,
    mlflow_run: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One training stage on this worker: fetch its inputs, train, publish the model.

    The work directory is `$TUNEGATE_SCRATCH` (default `runs/worker`); put it on a persistent volume
    and a stage started again after a lost worker resumes from its last checkpoint.
    """
    forward_stage_logs()  # the trainers' own lines show in this flow run's logs
    logger = get_run_logger()
    store = ArtifactStore(artifact_root)
    scratch = Path(os.environ.get("TUNEGATE_SCRATCH") or "runs/worker")
    try:
        model = run_stage(store, stage, spec, scratch, mlflow_run)
    except Exception as exc:  # the pipeline raises a TunegateError again, as its own type
        error = as_stage_error(exc, stage)  # out of memory comes back saying what to lower
        if isinstance(error, errors.TunegateError):
            store.put_json(result, errors.to_outcome(error))
        if error is exc:
            raise
        raise error from exc
    store.put_json(result, {"artifact": model.model_dump(mode="json")})
    logger.info("%s: published %s", stage, model.path)
    return model.model_dump(mode="json")


def run_stage(
    store: ArtifactStore,
    stage: str,
    spec: dict[str, Any],
    scratch: Path,
    mlflow_run: dict[str, str] | None = None,
) -> ModelArtifact:
    """What `train_stage` does, without Prefect: the stage's model, published to `store`."""
    import mlflow

    types = STAGES[stage][1]
    cache = scratch / "artifacts"
    args = [
        store.fetch(t.model_validate(a), cache)
        if t in (InstructionDataset, ModelArtifact) and a
        else _load(t, a)
        for t, a in zip(types, spec["args"], strict=True)
    ]
    out_dir = scratch / "stages" / f"{stage}-{uuid.uuid4().hex[:12]}"
    name = spec.get("checkpoint_name")
    train = launched(stage)
    kwargs = {
        "out_dir": out_dir,
        "seed": spec["seed"],
        "checkpoint_dir": scratch / "checkpoints" / name if name else None,
        "gpus": spec.get("gpus", 1),
        "accelerate_config": spec.get("accelerate_config"),
    }
    if mlflow_run:  # the trainers log their curves to the pipeline's stage run
        mlflow.set_tracking_uri(mlflow_run["tracking_uri"])
        with mlflow.start_run(run_id=mlflow_run["run_id"]):
            model = train(*args, **kwargs)
    else:
        model = train(*args, **kwargs)
    return store.publish(model)


def check_deployment(run: RunSection) -> None:
    """With placement: pools, the training deployment must exist before anything trains.

    Raises:
        ConfigError: it is not on the Prefect server the pipeline talks to.
    """
    if run.placement != "pools":
        return
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(run.training_deployment)
        except ObjectNotFound:
            raise errors.ConfigError(
                [
                    f"run.placement=pools: the deployment {run.training_deployment!r} is not on the Prefect "
                    f"server at {client.api_url}: register it with `tunegate deploy` and start a worker for "
                    "its pool (`tunegate up --training-pool gpu` locally), or set run.placement: local"
                ]
            ) from None


def _is_record(a: Any) -> bool:
    return isinstance(a, InstructionDataset | ModelArtifact)


def _dump(a: Any) -> Any:
    return a.model_dump(mode="json") if a is not None else None


def _load(t: type, a: Any) -> Any:
    return t.model_validate(a) if a is not None else None


def _cancel(flow_run_id) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Cancelling(message="the pipeline stopped waiting"), force=True)
