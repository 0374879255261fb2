"""Helpers the training stages share: device choice, what trains (LoRA, DoRA, QLoRA, full,
partial), guards that training stays finite and changed something, and seeding. Checkpoints and
resumption are in tasks/checkpoints.py; saving and loading models in tasks/model_io.py."""

from __future__ import annotations

import math
import re

from tunegate.config import LoraSection, TrainSection
from tunegate.errors import ConfigError, TrainingError


def on_cuda() -> bool:
    """Whether a CUDA GPU is present: the stages pick bf16 (and QLoRA becomes possible) on one."""
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


def seed_everything(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)
