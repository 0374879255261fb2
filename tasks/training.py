"""Helpers the training stages share: TRL arguments, device choice, LoRA, guards, atomic saving."""

from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

from tunegate.config import LoraSection, TrainSection
from tunegate.errors import TrainingError

log = logging.getLogger(__name__)


def on_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def trl_kwargs(cfg: TrainSection, out_dir: Path, seed: int) -> dict[str, Any]:
    """Arguments common to every TRL config class, then the section's pass-through `trl_args`."""
    import mlflow

    cuda = on_cuda()
    kwargs: dict[str, Any] = {
        "output_dir": str(out_dir / "trainer"),
        "max_steps": cfg.max_steps,
        "learning_rate": cfg.learning_rate,
        "per_device_train_batch_size": cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "warmup_steps": cfg.warmup_steps,
        "lr_scheduler_type": cfg.lr_scheduler_type,
        "logging_steps": cfg.logging_steps,
        "seed": seed,
        "data_seed": seed,
        "bf16": cuda,
        "use_cpu": not cuda,
        # Recomputing activations saves memory a 135M model on CPU does not need, at ~25% more time.
        "gradient_checkpointing": False,
        "save_strategy": "no",
        # The default filter hides NaN/inf losses from the logs; the guard below must see them.
        "logging_nan_inf_filter": False,
        "report_to": ["mlflow"] if mlflow.active_run() is not None else [],
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    kwargs.update(cfg.trl_args)
    return kwargs


def lora_config(cfg: LoraSection, task_type: str, model):
    """PEFT LoRA config; with `top_layers`, only the top layers get adapters (and gradients)."""
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


def require_trained(model, stage: str) -> float:
    delta = lora_delta_norm(model)
    if not delta > 0 or not math.isfinite(delta):
        raise TrainingError(
            f"{stage}: the adapter weights did not change (norm {delta}); nothing was trained"
        )
    return delta


def save_model_atomic(model, tokenizer, path: Path) -> None:
    """Write to a temporary directory, then rename: a crash never leaves a half-written model."""
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def load_causal_lm(path: str):
    """A causal LM and its tokenizer (pad token set), bf16 on CUDA, fp32 on CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.bfloat16 if on_cuda() else torch.float32
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype), tokenizer


def seed_everything(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)
