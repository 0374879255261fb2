"""`tunegate` command line: thin entry points, heavy imports inside the commands."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

# A fresh Prefect home creates its database at the first start of the temporary API server; on a busy
# machine that took 28 s, past Prefect's 20 s, and the run died before it began. A value the user set
# (environment, profile) wins.
EPHEMERAL_STARTUP_TIMEOUT_S = 180
PREFECT_COMMANDS = ("run", "rollback", "deploy", "up")
# Prefect raises a bare RuntimeError with this message when its temporary server does not come up.
EPHEMERAL_TIMED_OUT = "Timed out while attempting to connect to ephemeral Prefect API server"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tunegate", description="Fine-tune, gate and ship language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the whole pipeline")
    run.add_argument("--config", type=Path, help="YAML preset (defaults apply where it is silent)")
    run.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sft.max_steps=10")

    val = sub.add_parser("validate", help="validate one data file (exit 0 pass, 1 fail, 2 usage error)")
    val.add_argument(
        "path",
        help="file (also .gz/.bz2/.xz/.zst), directory, glob, or Hub dataset hf:ORG/NAME@REVISION:SPLIT",
    )
    val.add_argument(
        "--kind",
        required=True,
        choices=["sft", "preference", "preferences", "prompts", "eval"],
        help="data kind ('preference' and 'preferences' are the same)",
    )
    val.add_argument("--config", type=Path)
    val.add_argument("--format", choices=["text", "markdown", "json"], default="text")
    val.add_argument(
        "--gx",
        action="store_true",
        help="evaluate the expectation suite with Great Expectations, as the pipeline does (slower start)",
    )

    back = sub.add_parser("rollback", help="point the champion alias back at the `previous` version")
    back.add_argument("name", help="registered model name")
    back.add_argument("--config", type=Path, help="config whose registry section names the store")
    back.add_argument("overrides", nargs="*", help="dotted overrides, e.g. registry.tracking_uri=...")

    trace = sub.add_parser("lineage", help="print where a registered version came from, as a tree")
    trace.add_argument("ref", help="NAME@ALIAS or NAME/VERSION, e.g. tiny-assistant@champion")
    trace.add_argument("--config", type=Path, help="config whose registry section names the store")
    trace.add_argument("overrides", nargs="*", help="dotted overrides, e.g. registry.tracking_uri=...")

    show = sub.add_parser("config", help="print the resolved configuration")
    show.add_argument("--config", type=Path)
    show.add_argument("overrides", nargs="*")

    up = sub.add_parser("up", help="start a Prefect server, an MLflow server and a worker on 127.0.0.1")
    up.add_argument(
        "--home",
        type=Path,
        help="keep all state (Prefect database, MLflow store, logs) under DIR; default: ./mlflow.db and "
        "Prefect's own home, the stores `tunegate run` writes",
    )
    up.add_argument("--prefect-port", type=int, default=4200)
    up.add_argument("--mlflow-port", type=int, default=5000)
    up.add_argument("--pool", default="local", help="process work pool the worker polls")
    up.add_argument(
        "--training-pool",
        help="also start a worker for this process pool, standing in for the GPU pool that runs training "
        "stages with run.placement: pools (e.g. gpu, the pool prefect.yaml names)",
    )

    dep = sub.add_parser("deploy", help="register the deployments of deployments/prefect.yaml")
    dep.add_argument(
        "--config", type=Path, help="preset for the run form's defaults (default: configs/demo.yaml)"
    )
    dep.add_argument(
        "--api-url", help="Prefect API, e.g. http://127.0.0.1:4200/api (default: PREFECT_API_URL)"
    )
    dep.add_argument(
        "--pool", help="work pool for the pipeline's deployments (default: the one prefect.yaml names)"
    )
    dep.add_argument(
        "--training-pool",
        help="work pool for the training-stage deployment, e.g. k8s-gpu (default: the one prefect.yaml names)",
    )
    dep.add_argument("--timezone", help="IANA timezone for the nightly schedule (default: prefect.yaml's)")
    dep.add_argument(
        "--gpu-pools", action="store_true", help="also create the Kubernetes and Docker GPU pools"
    )
    dep.add_argument("overrides", nargs="*", help="dotted overrides, e.g. registry.tracking_uri=http://...")

    args = parser.parse_args(argv)
    console = logging.StreamHandler()
    console.setFormatter(ConsoleFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=logging.WARNING, handlers=[console])
    for name in ("tunegate", "tasks", "flows", "data_checks"):
        logging.getLogger(name).setLevel(logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return guarded(lambda: _dispatch(args), prefect=args.command in PREFECT_COMMANDS)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "run":
        return _run(args)
    if args.command == "validate":
        return _validate(args)
    if args.command == "rollback":
        return _rollback(args)
    if args.command == "lineage":
        return _lineage(args)
    if args.command == "up":
        return _up(args)
    if args.command == "deploy":
        return _deploy(args)
    return _show(args)


def guarded(command: Callable[[], int], *, prefect: bool = True) -> int:
    """Run one command as the CLI runs each: with room for Prefect's temporary API server to start
    (`prefect`), and the errors a person can act on reported on stderr instead of as a traceback.

    Returns:
        the command's exit code; 2 for a configuration error; 1 for another error tunegate raised on
        purpose, or a store that did not answer or start (one line saying what to do).

    Raises:
        any other exception the command raised (a bug: its traceback is what helps).
    """
    from tunegate.errors import ConfigError, TunegateError

    try:
        with prefect_startup_room() if prefect else contextlib.nullcontext():
            return command()
    except ConfigError as exc:
        print(f"tunegate: {exc}", file=sys.stderr)
        return 2
    except TunegateError as exc:
        print(f"tunegate: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        if (line := store_failure(exc)) is None:
            raise
        print(f"tunegate: {line}", file=sys.stderr)
        return 1


class ConsoleFormatter(logging.Formatter):
    """The terminal's log format. A failure that `guarded` reports on the last line (an error tunegate
    raised on purpose, a store out of reach) is logged there without its traceback: Prefect's run
    loggers would print one per failed task and flow. The Prefect UI keeps the traceback."""

    def format(self, record: logging.LogRecord) -> str:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and _reported_on_last_line(exc):
            record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None})
        return super().format(record)


def _reported_on_last_line(exc: BaseException) -> bool:
    from tunegate.errors import TunegateError

    return isinstance(exc, TunegateError) or store_failure(exc) is not None


def prefect_startup_room() -> contextlib.AbstractContextManager:
    """Prefect settings in which the temporary API server has EPHEMERAL_STARTUP_TIMEOUT_S to start,
    unless the user set PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (environment or profile)."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

    return temporary_settings(
        set_defaults={PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: EPHEMERAL_STARTUP_TIMEOUT_S}
    )


def store_failure(exc: BaseException) -> str | None:
    """One line saying which store did not answer and what to do, or None when `exc` is no such
    failure: Prefect's temporary API server not starting, a Prefect API not answering, the MLflow
    tracking server out of reach or its database locked."""
    from flows.retries import is_transient
    from tunegate.out_of_memory import causes

    chain = list(causes(exc))
    for link in chain:
        if isinstance(link, RuntimeError) and str(link).startswith(EPHEMERAL_TIMED_OUT):
            return _ephemeral_did_not_start(str(link))
    if not is_transient(exc):
        return None
    detail = _detail(chain[-1])
    httpx = sys.modules.get("httpx")
    if httpx is not None and any(isinstance(e, httpx.HTTPError) for e in chain):  # Prefect's client
        from prefect.settings import PREFECT_API_URL

        if url := PREFECT_API_URL.value():
            return (
                f"the Prefect API at {url} did not answer ({detail}); start it (`tunegate up`, or "
                "`prefect server start`) and rerun, or unset PREFECT_API_URL to run on a temporary local API"
            )
        return f"Prefect's temporary API server stopped answering ({detail}); rerun"
    sqlite3 = sys.modules.get("sqlite3")
    if sqlite3 is not None and any(isinstance(e, sqlite3.OperationalError) for e in chain):
        return (
            f"the MLflow store is locked by another process ({detail}); rerun when that process has finished"
        )
    where = next((f" at {url}" for e in chain if (url := _request_origin(e))), "")
    return f"the MLflow tracking server{where} did not answer ({detail}); start it (`tunegate up`) and rerun"


def _request_origin(exc: BaseException) -> str | None:
    """scheme://host:port of the request a requests exception failed on (MLflow's client uses requests)."""
    from urllib.parse import urlsplit

    url = getattr(getattr(exc, "request", None), "url", None)
    if not isinstance(url, str):
        return None
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _ephemeral_did_not_start(message: str) -> str:
    import re

    from prefect.settings import PREFECT_HOME, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    with prefect_startup_room():
        timeout = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
    exited = re.search(r"exited with code (-?\d+)", message)
    if exited:
        return (
            f"Prefect's temporary API server exited at start (code {exited.group(1)}; its database is "
            f"under {PREFECT_HOME.value()}); run `prefect server start` to see why, or start a server "
            "(`tunegate up`) and set PREFECT_API_URL"
        )
    return (
        f"Prefect's temporary API server did not start within {timeout} s (a first start creates its "
        f"database under {PREFECT_HOME.value()}); set PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS "
        "higher and rerun, or start a server once (`tunegate up`) and set PREFECT_API_URL"
    )


def _detail(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


def _rollback(args) -> int:
    from tasks.promotion_lock import promotion_lock
    from tasks.registry import rollback
    from tunegate.config import load_config
    from tunegate.errors import PromotionError

    cfg = load_config(args.config, [*args.overrides, f"registry.model_name={args.name}"])
    try:
        result = rollback(cfg.registry, promotion_lock(cfg.registry))
    except PromotionError as exc:
        print(f"tunegate: {exc}", file=sys.stderr)
        return 1
    print(f"{result.model_name}: {cfg.registry.alias} -> version {result.version} ({result.reason})")
    return 0


def _lineage(args) -> int:
    from flows.lineage import lineage, render_tree
    from tunegate.config import load_config
    from tunegate.errors import ConfigError

    cfg = load_config(args.config, args.overrides)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        tree = lineage(cfg.registry.tracking_uri, args.ref)
    except ConfigError as exc:  # a reference that does not resolve: one line, the fix in it
        print(f"tunegate: {'; '.join(exc.problems)}", file=sys.stderr)
        return 1
    print(render_tree(tree))
    return 0


def _up(args) -> int:
    from flows.deploy import ServerError
    from flows.stack import up

    try:
        up(
            args.home,
            prefect_port=args.prefect_port,
            mlflow_port=args.mlflow_port,
            pool=args.pool,
            training_pool=args.training_pool,
        )
    except ServerError as exc:
        print(f"tunegate: {exc}", file=sys.stderr)
        return 1
    return 0


def _deploy(args) -> int:
    from flows.deploy import DEFAULT_PRESET, ServerError, deploy

    try:
        ids = deploy(
            args.api_url,
            args.config or DEFAULT_PRESET,
            args.overrides,
            pool=args.pool,
            training_pool=args.training_pool,
            timezone=args.timezone,
            gpu_pools=args.gpu_pools,
        )
    except ServerError as exc:
        print(f"tunegate: {exc}", file=sys.stderr)
        return 1
    from prefect.settings import PREFECT_API_URL

    ui = (args.api_url or PREFECT_API_URL.value() or "").removesuffix("/api")
    for name, deployment_id in ids.items():
        print(f"deployed {name}: {ui}/deployments/deployment/{deployment_id}")
    return 0


def _show(args) -> int:
    import yaml

    from tasks.benchmarks import check_benchmarks
    from tasks.trainer_args import check_trainer_args
    from tunegate.config import load_config
    from tunegate.errors import ConfigError

    cfg = load_config(args.config, args.overrides)
    # what the run would refuse first thing
    if problems := check_trainer_args(cfg) + check_benchmarks(cfg.evaluate.benchmarks):
        raise ConfigError(problems, args.config)
    print(yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False))
    return 0


def _validate(args) -> int:
    from tasks.base_model import prepare_base_model
    from tasks.validate import check_kind, load_tokenizer
    from tunegate.config import load_config

    cfg = load_config(args.config)
    kind = "preferences" if args.kind == "preference" else args.kind
    base = prepare_base_model(cfg.model)
    tokenizer = load_tokenizer(
        base.path, trust_remote_code=base.trust_remote_code, chat_template=base.chat_template
    )
    checked = check_kind(
        cfg.validate_,
        kind,
        args.path,
        tokenizer,
        cfg.model.system_prompt,
        cfg.data.shapes.get(kind),
        train_on=cfg.sft.train_on,
        suite_engine="gx" if args.gx else "pandas",
    )
    r = checked.report
    if args.format == "json":
        import json

        print(json.dumps(r.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(r.to_markdown() if args.format == "markdown" else r.to_text())
    return 0 if r.passed else 1


def _run(args) -> int:
    from flows.pipeline import pipeline
    from tunegate.config import load_config
    from tunegate.errors import DataValidationError, StageGateFailed, TrainingError

    cfg = load_config(args.config, args.overrides)
    try:
        result = pipeline(cfg)
    except DataValidationError as exc:
        print(f"\ntunegate: stopped before training: {exc}", file=sys.stderr)
        return 1
    except (StageGateFailed, TrainingError) as exc:
        print(f"\ntunegate: stopped: {exc}", file=sys.stderr)
        return 1
    print(summary(result))
    return 0


def summary(result: dict) -> str:
    """What a person wants after a run: scores side by side, verdict, registry, where to look."""
    from prefect.settings import PREFECT_API_URL

    verdict, reg = result["verdict"], result["registration"]
    lines = ["", "=" * 78, verdict["markdown"], ""]
    if result.get("outcome"):  # nothing to decide: no new data, or the candidate is the champion already
        lines.append(
            f"Nothing trained or registered: {reg['reason']} (models:/{reg['model_name']}@{reg['aliases'][0]})"
        )
    elif reg["promoted"]:
        lines.append(
            f"Registered: {reg['model_name']} version {reg['version']}, alias "
            f"{', '.join(reg['aliases'])} (models:/{reg['model_name']}@{reg['aliases'][0]})"
        )
    else:
        where = f" (version {reg['version']} registered without alias)" if reg.get("version") else ""
        lines.append(f"NOT PROMOTED{where}: {reg['reason']}")
    if result.get("telemetry"):  # per training stage: flows/progress.py stage_telemetry
        from flows.progress import telemetry_table

        lines += ["", "Training (a stage from the cache shows the run that trained it):"]
        lines += [f"  {row}" for row in telemetry_table(result["telemetry"])]
    tracking = result["tracking_uri"]
    lines += [
        "",
        f"MLflow run {result['mlflow_run_id']} in experiment {result['experiment']!r}; outputs in {result['run_dir']}",
        "See the runs:",
        f"  MLflow UI:  mlflow ui --backend-store-uri {tracking} --host 127.0.0.1 --port 5000"
        "   -> http://127.0.0.1:5000",
        "  Prefect UI: prefect server start --host 127.0.0.1 --port 4200   -> http://127.0.0.1:4200"
        f"  (flow run {result['flow_run_id']})"
        if not PREFECT_API_URL.value()
        else f"  Prefect UI: {PREFECT_API_URL.value().removesuffix('/api')}  (flow run {result['flow_run_id']})",
        "  (from this directory, with the virtualenv active: . .venv/bin/activate)",
        "=" * 78,
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
