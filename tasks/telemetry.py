"""Per-step training telemetry: throughput, peak memory, a log line and a progress file.

`training_telemetry(stage, progress_file)` is a transformers `TrainerCallback`. At every logging step
it computes, over the interval since the previous logging step:

- `tokens_per_s`: from the cumulative `num_tokens` that every TRL 1.16 trainer logs, summed over all
  processes. What a token is depends on the trainer: SFT counts the non-padding tokens of each batch
  (prompt and answer; with padding-free packing, the packed length); the reward trainer and DPO the
  non-padding tokens of chosen and rejected sequences together; GRPO and RLOO the prompt tokens plus
  the generated completion tokens, counted when a batch is generated. Absent if not logged.
- `samples_per_s`: optimizer steps × per_device_train_batch_size × gradient_accumulation_steps ×
  processes. A sample is what the trainer batches: an SFT row (a packed sequence with packing), a
  preference pair (reward, DPO), a completion (GRPO, RLOO: `num_generations` of them per prompt).
- `peak_memory_mib`: since training began, in this (the main) process: `torch.cuda.max_memory_allocated`
  on CUDA, else the process's peak resident memory (`resource.getrusage`), which includes the weights,
  data and Python itself. Both peaks are reset when training begins (on Linux, through
  /proc/self/clear_refs), so stages run one after another in one process each report their own; where
  the reset is refused, the CPU figure is the process's peak since it started.

Intervals are wall-clock time, so one that holds an evaluation reads slower. The trainer's own MLflow
callback runs before user callbacks, so adding these to the step's `logs` would be too late for it:
they are logged to the active MLflow run directly, at `state.global_step`, when the trainer reports to
MLflow. Each logging step is also one INFO line on this module's logger, with the trainer's figures
(loss, learning rate, ...), so a long stage shows signs of life wherever its logs are forwarded.

Whole-stage totals (`totals()`, for the stage's `ModelArtifact.metrics`) cover this `train()` call:
after a resume, the steps since the checkpoint. The progress file (JSON, written atomically by the
main process at the start, at each logging step and at the end) holds the stage, step, max_steps,
latest loss, elapsed and ETA seconds, tokens/s and when it was updated; `flows/progress.py` shows it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# The stage totals added to a training stage's metrics (one name per concept, as in the MLflow runs).
TOTALS = (
    "train_tokens",
    "train_samples",
    "train_seconds",
    "train_tokens_per_s",
    "train_samples_per_s",
    "peak_memory_mib",
)

# Trainers whose `num_tokens` is `state.num_input_tokens_seen`, which a checkpoint restores; the others
# count from zero in each `train()` call.
_COUNTS_IN_STATE = ("GRPOConfig", "RLOOConfig")


def training_telemetry(stage: str, progress_file: Path | None = None):
    """The telemetry callback for one stage's trainer.

    Args:
        stage: the stage's name, in log lines and the progress file.
        progress_file: where the main process keeps the progress JSON; None: no file.

    Returns:
        A `TrainerCallback`; after `train()`, its `totals()` are the stage totals (see the module).
    """
    from transformers import TrainerCallback

    class TrainingTelemetry(Telemetry, TrainerCallback):
        pass

    return TrainingTelemetry(stage, progress_file)


class Telemetry:
    """The callback's logic, free of transformers (see `training_telemetry`)."""

    def __init__(self, stage: str, progress_file: Path | None = None) -> None:
        self.stage = stage
        self.progress_file = Path(progress_file) if progress_file is not None else None
        self._began = False
        self._cuda = False
        self._samples_per_step = 0
        self._token_base = 0.0
        self._start = self._last_t = self._end = 0.0
        self._start_step = self._last_step = self._end_step = 0
        self._tokens: float | None = None
        self._last_tokens = 0.0
        self._loss: float | None = None
        self._runtime: float | None = None
        self._peak = 0.0

    def on_train_begin(self, args, state, control, **kwargs: Any) -> None:
        self._began = True
        self._cuda = getattr(args.device, "type", "cpu") == "cuda"
        self._samples_per_step = (
            args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        )
        counts_in_state = any(c.__name__ in _COUNTS_IN_STATE for c in type(args).__mro__)
        self._token_base = float(state.num_input_tokens_seen) if counts_in_state else 0.0
        self._start = self._last_t = time.perf_counter()
        self._start_step = self._last_step = state.global_step
        reset_peak_memory(self._cuda)
        if state.is_world_process_zero:
            self._write(state, finished=False)

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        logs = logs if logs is not None else {}
        if not self._began or any(k.startswith("eval_") for k in logs):
            return
        if "num_tokens" in logs:
            self._tokens = float(logs["num_tokens"]) - self._token_base
        if "loss" in logs:
            self._loss = float(logs["loss"])
        if "train_runtime" in logs:  # the trainer's closing summary
            self._runtime = float(logs["train_runtime"])
        step = state.global_step
        if step == self._last_step:  # the closing summary right after a logging step: nothing new
            return
        now = time.perf_counter()
        dt = max(now - self._last_t, 1e-9)
        self._peak = peak_memory_mib(self._cuda)
        figures = {
            "samples_per_s": (step - self._last_step) * self._samples_per_step / dt,
            "peak_memory_mib": self._peak,
        }
        if self._tokens is not None:
            figures["tokens_per_s"] = (self._tokens - self._last_tokens) / dt
            self._last_tokens = self._tokens
        self._last_t, self._last_step = now, step
        if not state.is_world_process_zero:
            return
        logs.update(figures)
        if _reports_to_mlflow(args):
            import mlflow

            if mlflow.active_run() is not None:
                mlflow.log_metrics(figures, step=step)
        eta = self._eta(state)
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in logs.items() if isinstance(v, int | float))
        log.info(
            "%s step %d/%d%s: %s",
            self.stage,
            step,
            state.max_steps,
            f" (ETA {format_duration(eta)})" if eta is not None else "",
            shown,
        )
        self._write(state, finished=False, tokens_per_s=figures.get("tokens_per_s"))

    def on_train_end(self, args, state, control, **kwargs: Any) -> None:
        if not self._began:
            return
        self._end = time.perf_counter()
        self._end_step = state.global_step
        self._peak = max(self._peak, peak_memory_mib(self._cuda))
        if not state.is_world_process_zero:
            return
        t = self.totals()
        log.info(
            "%s trained %d steps in %s: %s tokens/s, %s samples/s, peak memory %.0f MiB",
            self.stage,
            self._end_step - self._start_step,
            format_duration(t["train_seconds"]),
            _fmt(t.get("train_tokens_per_s", math.nan)),
            _fmt(t["train_samples_per_s"]),
            t["peak_memory_mib"],
        )
        self._write(state, finished=True, tokens_per_s=t.get("train_tokens_per_s"))

    def totals(self) -> dict[str, float]:
        """Whole-stage figures for this `train()` call; empty before training has ended.

        Seconds are the trainer's `train_runtime` (as plain TRL scripts report it), else this
        callback's own clock from the start to the end of training.
        """
        if not self._began or not self._end:
            return {}
        seconds = self._runtime if self._runtime is not None else self._end - self._start
        seconds = max(seconds, 1e-9)
        samples = float((self._end_step - self._start_step) * self._samples_per_step)
        out = {
            "train_samples": samples,
            "train_seconds": seconds,
            "train_samples_per_s": samples / seconds,
            "peak_memory_mib": self._peak,
        }
        if self._tokens is not None:
            out["train_tokens"] = self._tokens
            out["train_tokens_per_s"] = self._tokens / seconds
        return out

    def _eta(self, state) -> float | None:
        done = state.global_step - self._start_step
        if done <= 0:
            return None
        return (state.max_steps - state.global_step) * (time.perf_counter() - self._start) / done

    def _write(self, state, *, finished: bool, tokens_per_s: float | None = None) -> None:
        if self.progress_file is None:
            return
        eta = 0.0 if finished else self._eta(state)
        write_progress(
            self.progress_file,
            {
                "stage": self.stage,
                "step": state.global_step,
                "max_steps": state.max_steps,
                "loss": self._loss,
                "elapsed_s": round(time.perf_counter() - self._start, 3),
                "eta_s": round(eta, 3) if eta is not None else None,
                "tokens_per_s": tokens_per_s,
                "peak_memory_mib": self._peak or None,
                "finished": finished,
                "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            },
        )


def write_progress(path: Path, progress: dict[str, Any]) -> None:
    """Write `progress` as JSON through a temporary file and a rename: a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(progress), encoding="utf-8")
    os.replace(tmp, path)


def reset_peak_memory(cuda: bool) -> None:
    """Start the peak-memory count afresh for this stage (see the module docstring)."""
    if cuda:
        import torch

        torch.cuda.reset_peak_memory_stats()
        return
    try:  # Linux: "5" resets the process's peak resident set size, which getrusage reports
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # the peak stays the process's since start, as the module docstring says


def peak_memory_mib(cuda: bool) -> float:
    """Peak memory in MiB: CUDA memory allocated on this process's device, else peak resident memory."""
    if cuda:
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def _reports_to_mlflow(args) -> bool:
    report_to = args.report_to if isinstance(args.report_to, list | tuple) else [args.report_to]
    return "mlflow" in report_to or "all" in report_to


def _fmt(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def format_duration(seconds: float) -> str:
    """`4m05s`, or `1h02m` from an hour on."""
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
