"""Run a training stage in-process, in a process of its own, or across several GPUs through
`accelerate launch`.

With `threads` set (stages trained side by side, `run.parallel_stages`) the stage runs in one child
process limited to that many CPU threads, the same way as a launch. With `gpus > 1` the parent writes
the stage's arguments (pydantic sections and artifact records) as JSON, starts `accelerate launch
--num_processes N [--config_file F] -m tasks.launch SPEC RESULT`, and reads back the `ModelArtifact`
the main process wrote. An error in the workers comes back as the same error type with its message.
The trainers log to the stage's MLflow run (`MLFLOW_RUN_ID`). The parent claims the stage's checkpoint
directory for all the ranks (`claim_checkpoint_dir`) and passes the one it got in the spec; the ranks
claim nothing.

    python -m tasks.launch SPEC.json RESULT.json     # what each launched (or child) process runs
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tasks.checkpoints import CLAIMED_CHECKPOINT_DIR, claim_checkpoint_dir
from tunegate import errors
from tunegate.artifacts import InstructionDataset, ModelArtifact
from tunegate.config import AlignSection, RewardSection, SftSection
from tunegate.out_of_memory import as_stage_error

log = logging.getLogger(__name__)

# stage -> (function, the record type of each positional argument)
STAGES: dict[str, tuple[str, tuple[type[BaseModel], ...]]] = {
    "sft": ("tasks.sft:train_sft", (SftSection, InstructionDataset, ModelArtifact)),
    "reward-model": ("tasks.reward:train_reward_model", (RewardSection, InstructionDataset, ModelArtifact)),
    "judge-model": ("tasks.reward:train_judge_model", (RewardSection, InstructionDataset, ModelArtifact)),
    "align": (
        "tasks.align:align_policy",
        (AlignSection, InstructionDataset, ModelArtifact, ModelArtifact, ModelArtifact),
    ),
}


def stage_function(stage: str) -> Callable[..., ModelArtifact]:
    module, _, name = STAGES[stage][0].partition(":")
    return getattr(importlib.import_module(module), name)


def launched(stage: str) -> Callable[..., ModelArtifact]:
    """The stage's function, taking three more keywords: `gpus`, `accelerate_config` and `threads`
    (run it in a child process limited to that many CPU threads; None: in this process)."""
    fn = stage_function(stage)

    def run(
        *args: Any,
        gpus: int = 1,
        accelerate_config: str | None = None,
        threads: int | None = None,
        **kwargs: Any,
    ) -> ModelArtifact:
        if gpus <= 1 and threads is None:
            return fn(*args, **kwargs)
        return launch(stage, args, kwargs, gpus=gpus, accelerate_config=accelerate_config, threads=threads)

    run.__name__, run.__qualname__, run.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
    return run


def launch_command(gpus: int, accelerate_config: str | None, spec: Path, result: Path) -> list[str]:
    if gpus <= 1:  # one child process, no launcher
        return [sys.executable, "-m", "tasks.launch", str(spec), str(result)]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(gpus)]
    if accelerate_config:
        cmd += ["--config_file", accelerate_config]
    else:  # torchrun; without CUDA the processes train over gloo on CPU (how this path is tested)
        cmd += ["--multi_gpu"]
    return [
        *cmd,
        "--num_machines",
        "1",
        "--main_process_port",
        "0",
        "-m",
        "tasks.launch",
        str(spec),
        str(result),
    ]


def launch(
    stage: str,
    args: tuple,
    kwargs: dict[str, Any],
    *,
    gpus: int,
    accelerate_config: str | None,
    threads: int | None = None,
):
    """Run `stage` in `gpus` accelerate processes (one plain child process for `gpus` 1), each limited
    to `threads` CPU threads when given; return the main process's result.

    The checkpoint directory (`kwargs["checkpoint_dir"]`, else the stages' default `out_dir/trainer`)
    is claimed here, once for every rank, for as long as they run: the ranks train in the directory
    this process got (the shared one, or a private one when another run holds it) and claim nothing.

    Raises:
        the stage's own error type (ConfigError, TrainingError, StageGateFailed) when a worker fails;
        TrainingError when the launcher dies without a result.
    """
    out_dir = Path(kwargs["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    with claim_checkpoint_dir(Path(kwargs.get("checkpoint_dir") or out_dir / "trainer")) as checkpoint_dir:
        kwargs = {**kwargs, "checkpoint_dir": checkpoint_dir}
        code, outcome, logfile = _run_ranks(stage, args, kwargs, gpus, accelerate_config, threads)
    if outcome and "error" in outcome:
        raise errors.from_outcome(outcome)
    if code != 0 or outcome is None:
        tail = "".join(logfile.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)[-20:])
        raise errors.TrainingError(
            f"{stage}: its {'process' if gpus <= 1 else 'accelerate launch'} exited {code} without a "
            f"result; log {logfile}:\n{tail}"
        )
    return ModelArtifact.model_validate(outcome["artifact"])


def _run_ranks(
    stage: str,
    args: tuple,
    kwargs: dict[str, Any],
    gpus: int,
    accelerate_config: str | None,
    threads: int | None = None,
) -> tuple[int, dict | None, Path]:
    """Write the spec, start the ranks and wait for them; their exit code, outcome and log."""
    out_dir = Path(kwargs["out_dir"])
    spec, result, logfile = out_dir / "launch.json", out_dir / "launch.result.json", out_dir / "launch.log"
    for stale in (result, *_rank_errors(result)):
        stale.unlink(missing_ok=True)
    spec.write_text(
        json.dumps(
            {
                "stage": stage,
                "args": [a.model_dump(mode="json") if a is not None else None for a in args],
                "kwargs": {k: str(v) if isinstance(v, Path) else v for k, v in kwargs.items()},
            },
            indent=2,
        ),
        encoding="utf-8",
    )
    env = {**os.environ, CLAIMED_CHECKPOINT_DIR: str(kwargs["checkpoint_dir"])}
    if threads is not None:  # torch sizes its intra-op pool from these at start
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    import mlflow

    if (active := mlflow.active_run()) is not None:  # the workers' trainers log to this stage's run
        env.update(MLFLOW_RUN_ID=active.info.run_id, MLFLOW_TRACKING_URI=mlflow.get_tracking_uri())
    cmd = launch_command(gpus, accelerate_config, spec, result)
    log.info("%s: %s", stage, " ".join(cmd))
    with open(logfile, "w", encoding="utf-8") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, check=False).returncode
    outcome = json.loads(result.read_text()) if result.exists() else None
    if outcome is None and (failed := _rank_errors(result)):  # a worker failed before the main process wrote
        outcome = json.loads(failed[0].read_text())
    return code, outcome, logfile


def _rank_errors(result: Path) -> list[Path]:
    return sorted(result.parent.glob(f"{result.stem}.rank*.json"))


def _write_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    spec_path, result_path = (argv or sys.argv[1:])[:2]
    spec = json.loads(Path(spec_path).read_text())
    types = STAGES[spec["stage"]][1]
    args = [t.model_validate(a) if a is not None else None for t, a in zip(types, spec["args"], strict=True)]
    kwargs = {k: Path(v) if k.endswith("_dir") and v is not None else v for k, v in spec["kwargs"].items()}
    rank = int(os.environ.get("RANK", "0"))
    result = Path(result_path)
    import torch

    log.info("%s: rank %d, %d CPU threads", spec["stage"], rank, torch.get_num_threads())
    try:
        artifact = stage_function(spec["stage"])(*args, **kwargs)
    except Exception as exc:
        error = as_stage_error(exc, spec["stage"])  # out of memory comes back saying what to lower
        if not isinstance(error, errors.TunegateError):
            raise
        # every rank reports: the launcher may stop the main process as soon as another rank exits
        outcome = errors.to_outcome(error)
        _write_atomic(result if rank == 0 else result.with_name(f"{result.stem}.rank{rank}.json"), outcome)
        return 1
    if rank == 0:
        _write_atomic(result, {"artifact": artifact.model_dump(mode="json")})
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
