"""What a long stage shows in the Prefect UI while it runs: a progress bar, and the stage's logs.

- `watch(stage, progress_file)`: around a training stage inside a task run, a progress artifact that
  follows the progress file the stage's telemetry callback writes (`tasks/telemetry.py`): percent of
  steps done, and in its description the latest loss, throughput and ETA.
- `forward_stage_logs()`: tunegate's module loggers (and transformers' and TRL's) send their records to
  the run's logs in the Prefect API, not only to the console.
- `stage_telemetry(...)`: the per-stage throughput and memory figures the flow returns, for the closing
  summary of `tunegate run`.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tasks.telemetry import TOTALS, format_duration
from tunegate.artifacts import ModelArtifact

log = logging.getLogger(__name__)

# Loggers whose records reach the Prefect run logs. Ours at INFO; transformers and TRL at the level
# their own verbosity settings give (warnings, by default: their INFO is model-loading chatter; the
# per-step figures come through `tasks.telemetry`'s logger).
OWN_LOGGERS = ("tunegate", "tasks", "flows", "data_checks")
LIBRARY_LOGGERS = ("transformers", "trl")


def forward_stage_logs() -> None:
    """Send the records of tunegate's loggers, and of transformers' and TRL's, to the Prefect run logs.

    Prefect's own switch, `PREFECT_LOGGING_EXTRA_LOGGERS` (`logging.extra_loggers`), is read once, when
    `import prefect` configures logging, so it must be in the environment before anything imports
    Prefect, which a worker's flow-run process does not arrange; and the handler it attaches warns for
    every record logged outside a run (a stage called from a test or `tunegate validate`). This attaches
    the same API handler at run time instead, passing on only records made inside a flow or task run.
    Our loggers are set to INFO. Idempotent: call it at the start of each flow that runs stages.
    """
    from prefect.logging.handlers import APILogHandler

    class RunLogHandler(APILogHandler):
        """Prefect's API log handler, for records made inside a run only."""

        def emit(self, record: logging.LogRecord) -> None:
            if getattr(record, "flow_run_id", None) is not None or _in_run():
                super().emit(record)

    for name in (*OWN_LOGGERS, *LIBRARY_LOGGERS):
        logger = logging.getLogger(name)
        if not any(type(h).__name__ == "RunLogHandler" for h in logger.handlers):
            logger.addHandler(RunLogHandler(level=logging.INFO))
        if name in OWN_LOGGERS and not logger.isEnabledFor(logging.INFO):
            logger.setLevel(logging.INFO)


@contextmanager
def watch(stage: str, progress_file: Path, interval_s: float = 5.0) -> Iterator[None]:
    """Show a stage's progress file as a Prefect progress artifact while the block runs.

    Inside a flow or task run, a background thread reads `progress_file` every `interval_s` seconds.
    The artifact (key `<stage>-progress`, attached to the run) is created when the file first appears,
    so a stage that trains nothing (or returns a cached result) shows none; its percentage is
    step / max_steps, its description the step, latest loss, tokens/s and ETA. When the block ends
    normally it is set to 100%; when it raises, it keeps the last progress and says where it stopped.
    Outside a run it does nothing. A progress file older than the block (an earlier try's) is ignored
    until the stage rewrites it. A failure to reach the Prefect API is logged once and never fails
    the stage: the progress bar is a display, the stage's own result is what counts.

    Args:
        stage: the stage's name, in the artifact's key and description.
        progress_file: the file the stage's telemetry callback writes (`<out_dir>/progress.json`).
        interval_s: seconds between reads.
    """
    if not _in_run():
        yield
        return
    watcher = _Watcher(stage, Path(progress_file))
    # A new thread starts with empty context variables: copy them, or Prefect's client would not see
    # the run's settings (the API URL of a test harness or profile override).
    thread = threading.Thread(
        target=contextvars.copy_context().run,
        args=(watcher.loop, interval_s),
        name=f"{stage}-progress",
        daemon=True,
    )
    thread.start()
    ok = False
    try:
        yield
        ok = True
    finally:
        watcher.stop.set()
        thread.join(timeout=60)
        watcher.finish(ok)


class _Watcher:
    def __init__(self, stage: str, progress_file: Path) -> None:
        self.stage = stage
        self.file = progress_file
        self.key = re.sub(r"[^a-z0-9]+", "-", f"{stage}-progress".lower()).strip("-")
        self.stop = threading.Event()
        self.since = time.time() - 1.0  # file-system timestamps are coarse
        self.artifact_id = None
        self.last: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._warned = False

    def loop(self, interval_s: float) -> None:
        while not self.stop.is_set():
            self.poll()
            self.stop.wait(interval_s)

    def poll(self) -> None:
        progress = self._read()
        if progress is None or progress == self.last:
            return
        self.last = progress
        self._show(_percent(progress), _describe(self.stage, progress))

    def finish(self, ok: bool) -> None:
        self.poll()
        if self.last is None:
            return
        if ok:
            self._show(100.0, _describe(self.stage, {**self.last, "finished": True}))
        else:
            self._show(
                _percent(self.last),
                _describe(self.stage, self.last)
                + f"\n\n**Stopped at step {self.last.get('step')}** (failed)",
            )

    def _read(self) -> dict[str, Any] | None:
        try:
            if self.file.stat().st_mtime < self.since:
                return None
            return json.loads(self.file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # not written yet (the writer renames a whole file into place)

    def _show(self, percent: float, description: str) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        with self._lock:  # the final update must not race a poll of the thread
            try:
                if self.artifact_id is None:
                    self.artifact_id = create_progress_artifact(
                        percent, key=self.key, description=description
                    )
                else:
                    update_progress_artifact(self.artifact_id, percent, description=description)
            except Exception as exc:  # the display only: training goes on without it
                if not self._warned:
                    log.warning("%s: could not update the progress artifact: %s", self.stage, exc)
                    self._warned = True


def _percent(progress: dict[str, Any]) -> float:
    steps = progress.get("max_steps") or 0
    if progress.get("finished"):
        return 100.0
    return min(100.0, 100.0 * float(progress.get("step") or 0) / steps) if steps > 0 else 0.0


def _describe(stage: str, p: dict[str, Any]) -> str:
    parts = [f"**{stage}** step {p.get('step')}/{p.get('max_steps')}"]
    if p.get("loss") is not None:
        parts.append(f"loss {p['loss']:.4g}")
    if p.get("tokens_per_s") is not None:
        parts.append(f"{p['tokens_per_s']:.0f} tokens/s")
    if p.get("finished"):
        parts.append(f"done in {format_duration(p.get('elapsed_s') or 0.0)}")
    elif p.get("eta_s") is not None:
        parts.append(f"ETA {format_duration(p['eta_s'])}")
    return " · ".join(parts) + (f" (updated {p['updated_at']})" if p.get("updated_at") else "")


def _in_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


def stage_telemetry(stages: dict[str, ModelArtifact | None]) -> dict[str, dict[str, float]]:
    """Per stage, its steps and the telemetry totals among its metrics (stages that did not run: left out).

    Args:
        stages: stage name -> the model it returned (None: the stage did not run).

    Returns:
        stage -> {"steps": ..., and those of `tasks.telemetry.TOTALS` the stage reported}.
    """
    return {
        name: {"steps": float(model.steps), **{k: model.metrics[k] for k in TOTALS if k in model.metrics}}
        for name, model in stages.items()
        if model is not None
    }


def telemetry_table(telemetry: dict[str, dict[str, float]]) -> list[str]:
    """`stage_telemetry`'s figures as text lines: one row per stage, `-` where a figure is missing."""
    columns = (
        ("steps", "steps", "{:.0f}"),
        ("train_seconds", "seconds", "{:.1f}"),
        ("train_tokens_per_s", "tokens/s", "{:.1f}"),
        ("train_samples_per_s", "samples/s", "{:.2f}"),
        ("peak_memory_mib", "peak MiB", "{:.0f}"),
    )
    width = max([len("stage"), *(len(name) for name in telemetry)])
    lines = [f"{'stage':<{width}}" + "".join(f"{title:>11}" for _, title, _ in columns)]
    for name, figures in telemetry.items():
        cells = (fmt.format(figures[key]) if key in figures else "-" for key, _, fmt in columns)
        lines.append(f"{name:<{width}}" + "".join(f"{c:>11}" for c in cells))
    return lines
