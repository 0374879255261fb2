"""Checkpoints and resumption for the training stages: each checkpoint's files are checksummed
when saved and checked before resuming; a checkpoint directory is claimed by one run at a time; a
full disk while checkpointing is a clear error that keeps the last complete checkpoint."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunegate.artifacts import sha256_file
from tunegate.errors import TrainingError

log = logging.getLogger(__name__)

CHECKSUMS = "tunegate-checksums.json"


def last_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest usable checkpoint, checked against the checksums written when it was saved.

    A checkpoint cut short by a crash (no `trainer_state.json`, which is written after the weights,
    or no checksums) is skipped; one whose files no longer match their checksums, or do not parse,
    is moved aside as `checkpoint-N.corrupt` and the next older one is used. Each is said in the log;
    with none usable the stage starts fresh."""
    if not checkpoint_dir.is_dir():
        return None
    found = sorted(
        (p for p in checkpoint_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
        reverse=True,
    )
    for ckpt in found:
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt
        if problem.startswith("incomplete"):
            log.warning("skipping %s: %s", ckpt, problem)
            continue
        aside = ckpt.with_name(f"{ckpt.name}.corrupt")
        shutil.rmtree(aside, ignore_errors=True)
        ckpt.rename(aside)
        older = "falling back to the previous checkpoint" if ckpt != found[-1] else "starting the stage fresh"
        log.warning("checkpoint %s is corrupted (%s): moved it to %s; %s", ckpt, problem, aside.name, older)
    if found:
        log.warning("no usable checkpoint in %s: starting the stage fresh", checkpoint_dir)
    return None


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why `ckpt` cannot be resumed from, or None. "incomplete ..." for a save that never finished."""
    weights = [*ckpt.glob("*.safetensors"), *ckpt.glob("*.bin")]
    if not (ckpt / "trainer_state.json").exists() or not weights or not (ckpt / CHECKSUMS).exists():
        return "incomplete (no trainer state, weights or checksums: the save never finished)"
    try:
        recorded = json.loads((ckpt / CHECKSUMS).read_text(encoding="utf-8"))
        json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))["global_step"]
    except (ValueError, KeyError) as exc:
        return f"unreadable state: {exc}"
    for name, digest in recorded.items():
        f = ckpt / name
        if not f.is_file():
            return f"{name} is missing"
        if sha256_file(f) != digest:
            return f"{name} does not match its checksum"
    return None


def checkpoint_checksums():
    """A callback that records every file's sha256 in each checkpoint right after it is saved."""
    from transformers import TrainerCallback

    class Checksums(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                files = {
                    f.relative_to(ckpt).as_posix(): sha256_file(f)
                    for f in sorted(ckpt.rglob("*"))
                    if f.is_file() and f.name != CHECKSUMS
                }
                tmp = ckpt / f".{CHECKSUMS}.tmp"
                tmp.write_text(json.dumps(files, indent=1), encoding="utf-8")
                os.replace(tmp, ckpt / CHECKSUMS)

    return Checksums()


def train_resumable(trainer, checkpoint_dir: Path) -> tuple[Any, int, Path]:
    """Train, resuming from the last good checkpoint in `checkpoint_dir` when there is one.

    The directory is claimed for the duration (`claim_checkpoint_dir`): a second run with the same
    inputs at the same time trains in a private directory instead of writing into (or deleting) this
    run's checkpoints. Under `accelerate launch`, or in a child process of its own (stages trained side
    by side), the launching process holds the claim for its processes (tasks/launch.py) and passes the
    directory it got. Returns the train output, the step resumed from (0: fresh) and the directory used.

    Raises:
        TrainingError: the disk filled up while writing a checkpoint (the last complete one is kept);
            or this is one of several launched processes and no launcher claimed `checkpoint_dir`.
    """
    trainer.add_callback(checkpoint_checksums())
    claimed = os.environ.get(CLAIMED_CHECKPOINT_DIR)
    if claimed is not None and Path(claimed) == checkpoint_dir:  # the launching process holds the claim
        return (*_train_from(trainer, checkpoint_dir), checkpoint_dir)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Ranks must not claim one by one: each would get a different directory to resume from.
        raise TrainingError(
            f"this process is one of {os.environ['WORLD_SIZE']} launched ranks, but no launcher claimed "
            f"the checkpoint directory {checkpoint_dir} for them ({CLAIMED_CHECKPOINT_DIR}="
            f"{claimed or 'unset'}); start multi-process stages with run.gpus, which launches them "
            "through tasks.launch"
        )
    with claim_checkpoint_dir(checkpoint_dir) as directory:
        trainer.args.output_dir = str(directory)
        return (*_train_from(trainer, directory), directory)


# Set by tasks.launch for the processes it starts: the directory it claimed for them.
CLAIMED_CHECKPOINT_DIR = "TUNEGATE_CLAIMED_CHECKPOINT_DIR"


@contextlib.contextmanager
def claim_checkpoint_dir(checkpoint_dir: Path) -> Iterator[Path]:
    """Claim `checkpoint_dir` for this process while inside; yields the directory to train in.

    That is `checkpoint_dir` itself, or, when another live process holds the claim (a run with the
    same inputs), a private `<name>-pid<N>` beside it. The claim is a kernel file lock beside the
    directory, so a killed holder's claim ends with it.
    """
    from filelock import FileLock, Timeout

    checkpoint_dir.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(checkpoint_dir.parent / f".{checkpoint_dir.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        private = checkpoint_dir.with_name(f"{checkpoint_dir.name}-pid{os.getpid()}")
        log.warning(
            "%s is in use by another run with the same inputs; checkpointing to %s", checkpoint_dir, private
        )
        yield private
        return
    try:
        yield checkpoint_dir
    finally:
        lock.release()


def _train_from(trainer, checkpoint_dir: Path) -> tuple[Any, int]:
    ckpt = last_checkpoint(checkpoint_dir)
    resumed = 0
    if ckpt is not None:
        resumed = json.loads((ckpt / "trainer_state.json").read_text())["global_step"]
        log.info("resuming from %s (step %d of %d)", ckpt, resumed, trainer.args.max_steps)
    try:
        result = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    except (OSError, RuntimeError) as exc:
        if not _disk_full(exc):
            raise
        kept = last_checkpoint(checkpoint_dir)
        raise TrainingError(
            f"the disk filled up while writing a checkpoint under {checkpoint_dir} ({exc}); nothing was "
            f"saved or registered. The last complete checkpoint, {kept.name if kept else 'none'}, is kept: "
            "free space (or point run.output_dir at a larger disk) and run again to resume from it"
        ) from exc
    return result, resumed


def _disk_full(exc: BaseException) -> bool:
    import errno

    while exc is not None:
        if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "no space left" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def finish_checkpoints(checkpoint_dir: Path) -> None:
    """The stage's result is saved: its checkpoints are no longer needed."""
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
