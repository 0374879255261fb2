"""What a run may touch, decided before it touches anything: the data roots a run from the Prefect
UI is confined to, and the secrets it reads from Prefect Secret blocks. (Whether model code may run
travels with each model's record: `ModelArtifact.trust_remote_code`.)"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from data_checks.readers import outside_roots, resolve_paths
from tasks.benchmarks import definition_files
from tunegate.config import PipelineConfig
from tunegate.environment import lent_environ
from tunegate.errors import ConfigError

# os.pathsep-separated directories; when set (the worker's environment, see `tunegate up`), every
# data file a run reads must lie inside one of them: a config from the UI form cannot reach elsewhere.
DATA_ROOTS_ENV = "TUNEGATE_DATA_ROOTS"


def data_roots() -> list[Path]:
    raw = os.environ.get(DATA_ROOTS_ENV, "")
    return [Path(p) for p in raw.split(os.pathsep) if p.strip()]


def check_data_roots(config: PipelineConfig) -> None:
    """Raises ConfigError naming each data file, and each file of a local benchmark task, outside the
    allowed roots (`..` and links resolved)."""
    roots = data_roots()
    if not roots:
        return
    problems = []
    for kind in ("sft", "preferences", "prompts", "eval"):
        spec = getattr(config.data, kind)
        for path in outside_roots(resolve_paths(spec), roots):
            problems.append(
                f"data.{kind}: {path} resolves to {path.resolve()}, outside the data roots this worker "
                f"allows ({DATA_ROOTS_ENV}={os.environ[DATA_ROOTS_ENV]}); put the file under one of them"
            )
    for i, spec in enumerate(config.evaluate.benchmarks):  # a task's YAMLs, code and data files
        if spec.include_path is None:
            continue
        for path in outside_roots(definition_files(spec.include_path), roots):
            problems.append(
                f"evaluate.benchmarks.{i}.include_path: {path} resolves to {path.resolve()}, outside the "
                f"data roots this worker allows ({DATA_ROOTS_ENV}={os.environ[DATA_ROOTS_ENV]}); a task "
                "definition may run code (`!function`): put it under one of them"
            )
    if problems:
        raise ConfigError(problems)


@contextlib.contextmanager
def secrets_from_blocks(mapping: dict[str, str]) -> Iterator[list[str]]:
    """Set each environment variable from its Prefect Secret block for the run, then restore it.

    Yields the variable names (never the values), for the run's tags.

    Raises:
        ConfigError: a block that does not exist or is not a Secret.
    """
    from prefect.blocks.system import Secret

    values: dict[str, str] = {}
    for var, block in mapping.items():  # every block read before any variable is set
        try:
            value = Secret.load(block).get()
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                [
                    f"run.secrets.{var}: no Prefect Secret block named {block!r} ({type(exc).__name__}); "
                    f"create it in the UI (Blocks → Secret) or with Secret(value=...).save({block!r})"
                ]
            ) from None
        values[var] = value if isinstance(value, str) else str(value)
    with lent_environ(values):
        yield sorted(mapping)
