"""Helpers the training stages share: device choice, what trains (LoRA, DoRA, QLoRA,
full, partial), checkpoints and resumption, guards, and atomic saving."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunegate.artifacts import BASE_REF, ModelArtifact, base_of, sha256_file
from tunegate.config import LoraSection, TrainSection
from tunegate.errors import ConfigError, TrainingError

log = logging.getLogger(__name__)


def on_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def require_mode_supported(cfg: TrainSection, stage: str) -> None:
    """QLoRA needs CUDA and bitsandbytes: say so before loading anything."""
    if cfg.mode != "qlora":
        return
    if not on_cuda():
        raise ConfigError(
            [
                f"{stage}.mode=qlora needs a CUDA GPU (bitsandbytes 4-bit weights) and none is present; "
                f"use {stage}.mode=lora (or dora) on this machine, or run the stage on a GPU worker"
            ]
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            [f"{stage}.mode=qlora needs bitsandbytes: pip install 'bitsandbytes>=0.45'"]
        ) from exc


def quantization_config(cfg: TrainSection):
    """4-bit NF4 weights with bf16 compute, for QLoRA; None otherwise."""
    if cfg.mode != "qlora":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def peft_for(cfg: TrainSection, task_type: str, model):
    """The PEFT config for adapter modes; for `partial`, freeze all but the top layers (no PEFT);
    for `full`, nothing to do."""
    if cfg.mode in ("lora", "dora", "qlora"):
        if cfg.mode == "qlora":
            from peft import prepare_model_for_kbit_training

            prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return lora_config(cfg.lora, task_type, model, dora=cfg.mode == "dora")
    if cfg.mode == "partial":
        freeze_lower_layers(model, cfg.trainable_layers)
    return None


def freeze_lower_layers(model, top: int) -> int:
    """Train only the top `top` transformer layers, the final norm and any task head; returns the
    number of trainable parameters."""
    n = model.config.num_hidden_layers
    keep = {str(i) for i in range(max(0, n - top), n)}
    trainable = 0
    for name, param in model.named_parameters():
        layer = re.search(r"\.layers\.(\d+)\.", f".{name}")
        head = name.split(".")[0] in ("score", "classifier") or re.search(r"(^|\.)norm\.weight$", name)
        param.requires_grad = bool(layer.group(1) in keep if layer else head)
        trainable += param.numel() if param.requires_grad else 0
    if not trainable:
        raise TrainingError(f"partial mode: no parameters left to train in the top {top} layers")
    return trainable


def lora_config(cfg: LoraSection, task_type: str, model, dora: bool = False):
    """PEFT LoRA (or DoRA) config; with `top_layers`, only the top layers get adapters (and gradients)."""
    from peft import LoraConfig

    layers, targets = None, cfg.target_modules
    if cfg.top_layers is not None:
        n = model.config.num_hidden_layers
        layers = list(range(max(0, n - cfg.top_layers), n))
        if targets == "all-linear":  # PEFT needs explicit names to restrict layers
            targets = _linear_module_names(model)
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        task_type=task_type,
        layers_to_transform=layers,
        use_dora=dora,
    )


def _linear_module_names(model) -> list[str]:
    """Leaf names of the linear layers inside the transformer blocks (not the output heads)."""
    import torch

    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def finite_loss_guard():
    """A callback that stops training with a clear error on a NaN or infinite loss."""
    from transformers import TrainerCallback

    class FiniteLossGuard(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(float(loss)):
                raise TrainingError(
                    f"training loss became {loss} at step {state.global_step}; nothing is saved or "
                    "registered. Lower the learning rate, check the data for empty or extreme rows, "
                    "or enable gradient clipping (trl_args.max_grad_norm)."
                )

    return FiniteLossGuard()


def lora_delta_norm(model) -> float:
    """Norm of the trained LoRA B matrices: zero means training changed nothing."""
    total = 0.0
    for name, param in model.named_parameters():
        if "lora_B" in name:
            total += float(param.detach().float().norm()) ** 2
    return total**0.5


def weights_fingerprint(model) -> float:
    """A sum over the trainable weights: equal before and after means training changed nothing."""
    import torch

    with torch.no_grad():
        return float(sum(p.detach().double().sum() for p in model.parameters() if p.requires_grad))


def require_trained(model, stage: str, before: float | None = None) -> float:
    """The size of what training changed: the LoRA B norm for adapters, else the change of the
    trainable weights' fingerprint taken `before` training."""
    if before is None:
        delta = lora_delta_norm(model)
        what = "adapter weights"
    else:
        delta = abs(weights_fingerprint(model) - before)
        what = "trainable weights"
    if not delta > 0 or not math.isfinite(delta):
        raise TrainingError(f"{stage}: the {what} did not change ({delta}); nothing was trained")
    return delta


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
    run's checkpoints. Under `accelerate launch` the launching process holds the claim for all ranks
    (tasks/launch.py) and passes the directory it got. Returns the train output, the step resumed
    from (0: fresh) and the directory used.

    Raises:
        TrainingError: the disk filled up while writing a checkpoint (the last complete one is kept);
            or this is one of several launched processes and no launcher claimed `checkpoint_dir`.
    """
    trainer.add_callback(checkpoint_checksums())
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Ranks must not claim one by one: each would get a different directory to resume from.
        claimed = os.environ.get(CLAIMED_CHECKPOINT_DIR)
        if claimed is None or Path(claimed) != checkpoint_dir:
            raise TrainingError(
                f"this process is one of {os.environ['WORLD_SIZE']} launched ranks, but no launcher claimed "
                f"the checkpoint directory {checkpoint_dir} for them ({CLAIMED_CHECKPOINT_DIR}="
                f"{claimed or 'unset'}); start multi-process stages with run.gpus, which launches them "
                "through tasks.launch"
            )
        return (*_train_from(trainer, checkpoint_dir), checkpoint_dir)
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


def save_policy(trainer, tokenizer, path: Path, save: str, base: ModelArtifact) -> None:
    """Merged full weights, or the adapter alone with the identity (path, digest, origin) of the model
    it was trained on beside it. Written to a temporary directory and renamed.

    Under FSDP or DeepSpeed the weights are sharded across processes: every process calls
    `trainer.save_model` (it gathers them, and only the main process writes), then the main process
    merges an adapter if asked and renames."""
    extra = {BASE_REF: base.model_dump(mode="json")} if save == "adapter" else None
    if not (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
        model = trainer.model
        if save == "merged" and hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        save_model_atomic(model, tokenizer, path, extra)
        return
    tmp = path.with_name(path.name + ".gathered")
    trainer.save_model(str(tmp))
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if save == "merged" and is_adapter(tmp):
        (tmp / BASE_REF).write_text(json.dumps(base.model_dump(mode="json")), encoding="utf-8")
        merged, _ = load_causal_lm(str(tmp), trust_remote_code=base.trust_remote_code)
        save_model_atomic(merged, tokenizer, path)
    else:
        save_model_atomic(_Saved(tmp), tokenizer, path, extra)
    shutil.rmtree(tmp, ignore_errors=True)


class _Saved:
    """A model already written to a directory, for `save_model_atomic`: saving copies the files."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def save_pretrained(self, target: Path, **_: Any) -> None:
        shutil.copytree(self.directory, target, dirs_exist_ok=True)


def save_model_atomic(model, tokenizer, path: Path, extra: dict[str, Any] | None = None) -> None:
    """Write to a temporary directory, then rename: a crash never leaves a half-written model.
    Under `accelerate launch`, only the main process writes."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    for name, content in (extra or {}).items():
        (tmp / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").exists()


def load_causal_lm(path: str, quantization=None, *, trust_remote_code: bool = False):
    """A causal LM and its tokenizer (pad token set): bf16 and SDPA attention on CUDA, fp32 on CPU.
    An adapter directory is loaded onto its base model and merged, so callers see one plain model.

    Code shipped with the model runs only with `trust_remote_code` (the record's, which comes from
    `model.trust_remote_code`); otherwise transformers' own architecture is used, or loading fails."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.bfloat16 if on_cuda() else torch.float32
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "attn_implementation": "sdpa",
        "trust_remote_code": trust_remote_code,
    }
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if is_adapter(path):
        from peft import PeftModel

        # The model the adapter was trained on: our reference (itself possibly an adapter), else PEFT's.
        if (ref := base_of(path)) is not None:
            base, _ = load_causal_lm(ref.path, quantization, trust_remote_code=trust_remote_code)
        else:
            config = json.loads((Path(path) / "adapter_config.json").read_text())
            base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], **kwargs)
        return PeftModel.from_pretrained(base, path).merge_and_unload(), tokenizer
    return AutoModelForCausalLM.from_pretrained(path, **kwargs), tokenizer


def seed_everything(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)
