"""Out of memory, recognised by type along an exception's causes and explained: which settings of the
stage that ran out lower its memory use. Never retried (the same settings would run out again). Used
by the flow's stage wrapper and by the processes that run a stage elsewhere (accelerate ranks, pool
workers), so the error comes back with its advice wherever the stage ran."""

from __future__ import annotations

import sys
from collections.abc import Iterator

from tunegate.errors import OutOfMemory

MAX_CAUSES = 20  # links followed along an exception's causes (a chain can loop)

# What torch's allocators say when they fail outside `torch.OutOfMemoryError` (CPU, older or other
# backends). Only a RuntimeError carrying one of these counts.
TORCH_OOM_MESSAGES = (
    "CUDA out of memory",
    "CUDA error: out of memory",
    "DefaultCPUAllocator: can't allocate memory",
    "MPS backend out of memory",
    "HIP out of memory",
    "XPU out of memory",
)

_TRAINING = (
    "{s}.per_device_train_batch_size (raise {s}.gradient_accumulation_steps to keep the effective batch)",
    "{s}.max_length",
    "{s}.trl_args.gradient_checkpointing: true",
    "{s}.mode: lora instead of full or partial",
)
# stage name (as the flow names it) -> what lowers its memory use, by config field
MEMORY_SETTINGS: dict[str, tuple[str, ...]] = {
    "sft": tuple(f.format(s="sft") for f in _TRAINING),
    "reward-model": tuple(f.format(s="reward") for f in _TRAINING),
    "judge-model": tuple(f.format(s="reward") for f in _TRAINING),  # trained with the reward settings
    "align": (
        *(f.format(s="align") for f in _TRAINING),
        "align.num_generations and align.max_completion_length (grpo, rloo)",
    ),
    "evaluate": ("evaluate.batch_size", "evaluate.max_new_tokens"),
}


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc`, or any of its causes, is out of memory: torch.OutOfMemoryError, MemoryError, or
    a RuntimeError from one of torch's allocators."""
    return any(out_of_memory_link(link) for link in causes(exc))


def as_stage_error(exc: BaseException, stage: str) -> BaseException:
    """The error a failed stage should end the run with.

    Args:
        exc: what the stage raised.
        stage: the stage's name in the flow (sft, reward-model, align, evaluate, ...).

    Returns:
        an `OutOfMemory` naming the settings of `stage` that lower its memory use, with `exc` as its
        cause, when `exc` is out of memory (see `is_out_of_memory`); any other exception unchanged.
        Raise what it returns: `raise as_stage_error(exc, name)`.
    """
    if isinstance(exc, OutOfMemory) or not is_out_of_memory(exc):
        return exc
    settings = list(MEMORY_SETTINGS.get(stage, ()))
    lower = f"lower its memory use: {'; '.join(settings)}" if settings else "free memory on the machine"
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    error = OutOfMemory(
        f"{stage} ran out of memory ({type(exc).__name__}: {first}). To run it, {lower}. Not retried: the "
        "same settings would run out of memory again",
        stage=stage,
        settings=settings,
    )
    error.__cause__ = exc
    return error


def causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then what it was raised from or during (as a traceback shows them), at most MAX_CAUSES."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen and len(seen) < MAX_CAUSES:
        seen.add(id(link))
        yield link
        link = link.__cause__ or (None if link.__suppress_context__ else link.__context__)


def out_of_memory_link(exc: BaseException) -> bool:
    """Whether this one exception (not its causes) is out of memory."""
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")  # not imported: no torch error can exist
    if torch is not None and isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in TORCH_OOM_MESSAGES)
