"""The errors tunegate raises on purpose. Each carries structured details for reports."""

from __future__ import annotations

from typing import Any


class TunegateError(Exception):
    """Base of every error tunegate raises on purpose."""


class ConfigError(TunegateError):
    """The configuration is invalid. `problems` lists every problem found, not just the first."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid configuration{where}:\n{lines}")


class DataValidationError(TunegateError):
    """Input data failed validation. `report` is the full report (see data_checks.report)."""

    def __init__(self, message: str, report: Any | None = None) -> None:
        self.report = report
        super().__init__(message)


class TrainingError(TunegateError):
    """A training stage could not produce a usable model (NaN loss, nothing trained, ...)."""


class OutOfMemory(TrainingError):
    """A stage ran out of memory (GPU or CPU); `settings` are the config fields that lower its use.
    Never retried: a rerun with the same settings runs out of memory again."""

    def __init__(self, message: str, stage: str | None = None, settings: list[str] | None = None) -> None:
        self.stage = stage
        self.settings = list(settings or [])
        super().__init__(message)


class StageGateFailed(TunegateError):
    """A gate inside the pipeline (e.g. the reward model's accuracy floor) stopped the run."""

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        self.details = details or {}
        super().__init__(message)


class PromotionError(TunegateError):
    """Registration or promotion failed; nothing was half-done (no alias moved)."""


class StoreUnavailable(TunegateError):
    """A store (the MLflow tracking server) did not answer within its bounded retries."""


def to_outcome(exc: TunegateError) -> dict[str, Any]:
    """A stage's error as JSON, for another process to raise again (`from_outcome`)."""
    outcome = {"error": type(exc).__name__, "message": str(exc), "problems": getattr(exc, "problems", None)}
    if isinstance(exc, OutOfMemory):
        outcome.update(stage=exc.stage, settings=exc.settings)
    return outcome


def from_outcome(outcome: dict[str, Any]) -> TunegateError:
    """The error `to_outcome` wrote, as its own type (a TrainingError for a type it does not know)."""
    cls = globals().get(outcome["error"])
    if not (isinstance(cls, type) and issubclass(cls, TunegateError)):
        cls = TrainingError
    if cls is ConfigError:
        return ConfigError(outcome.get("problems") or [outcome["message"]])
    if cls is OutOfMemory:
        return OutOfMemory(outcome["message"], outcome.get("stage"), outcome.get("settings"))
    return cls(outcome["message"])
