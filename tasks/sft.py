"""Stage 3: supervised fine-tuning with TRL's SFTTrainer.

The dataset is conversational prompt-completion, so the loss falls only on the assistant's answer
(and its end-of-turn token) whatever the chat template. What trains is the section's `mode`: LoRA or
DoRA adapters, QLoRA on a 4-bit base (CUDA), all weights, or only the top layers. Checkpoints let a
killed stage resume; early stopping on eval loss keeps the best model. The result is merged full
weights or the adapter alone, per `save`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from tasks.checkpoints import finish_checkpoints, train_resumable
from tasks.model_io import load_causal_lm, save_policy
from tasks.telemetry import training_telemetry
from tasks.trainer_args import trainer_config
from tasks.training import (
    finite_loss_guard,
    peft_for,
    quantization_config,
    require_mode_supported,
    require_trained,
    seed_everything,
    weights_fingerprint,
)
from tunegate.artifacts import InstructionDataset, ModelArtifact, sha256_dir
from tunegate.config import SftSection
from tunegate.errors import TrainingError

log = logging.getLogger(__name__)


def train_sft(
    cfg: SftSection,
    data: InstructionDataset,
    base: ModelArtifact,
    *,
    out_dir: Path,
    seed: int,
    checkpoint_dir: Path | None = None,
) -> ModelArtifact:
    """Fine-tune `base` on the SFT split; return the model with its train/eval losses.

    `checkpoint_dir` (default `out_dir/trainer`) holds resumable checkpoints; a stage started again
    with the same directory resumes from the last good one and finishes at the same total steps.

    Raises:
        ConfigError: mode=qlora without CUDA; `trl_args` that TRL or tunegate refuse.
        TrainingError: the loss became NaN/inf, or nothing changed.
    """
    require_mode_supported(cfg, "sft")
    seed_everything(seed)
    from datasets import Dataset
    from transformers import EarlyStoppingCallback
    from trl import SFTTrainer

    checkpoint_dir = checkpoint_dir or out_dir / "trainer"
    args = trainer_config("sft", cfg, output_dir=checkpoint_dir, seed=seed)
    train = Dataset.from_parquet(data.splits["sft_train"].path)
    evalset = Dataset.from_parquet(data.splits["sft_eval"].path) if data.splits["sft_eval"].rows else None
    model, tokenizer = load_causal_lm(
        base.path, quantization_config(cfg), trust_remote_code=base.trust_remote_code
    )
    peft_config = peft_for(cfg, "CAUSAL_LM", model)
    telemetry = training_telemetry("sft", out_dir / "progress.json")
    callbacks = [finite_loss_guard(), telemetry]
    if cfg.early_stopping_patience is not None:
        if evalset is None:
            raise TrainingError(
                "sft.early_stopping_patience needs held-out SFT rows (build.eval_fraction > 0)"
            )
        callbacks.append(  # evaluation and best-model settings: tasks/trainer_args.py
            EarlyStoppingCallback(
                early_stopping_patience=cfg.early_stopping_patience,
                early_stopping_threshold=cfg.early_stopping_min_delta,
            )
        )
    before = None if peft_config is not None else weights_fingerprint(model)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evalset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    result, resumed, checkpoint_dir = train_resumable(trainer, checkpoint_dir)
    delta = require_trained(trainer.model, "sft", before)
    metrics = {
        "train_loss": float(result.training_loss),
        "weights_delta": delta,
        "resumed_from_step": float(resumed),
        "trainable_params": float(sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)),
    }
    metrics.update(telemetry.totals())
    if evalset is not None:
        metrics["eval_loss"] = float(trainer.evaluate()["eval_loss"])
    if trainer.state.best_model_checkpoint:
        metrics["best_step"] = float(trainer.state.best_model_checkpoint.rsplit("-", 1)[-1])
    if not all(math.isfinite(v) for v in metrics.values()):
        raise TrainingError(f"sft: non-finite metrics after training: {metrics}")

    path = out_dir / "model"
    save_policy(trainer, tokenizer, path, cfg.save, base)
    finish_checkpoints(checkpoint_dir)
    log.info("sft done: %s", metrics)
    return ModelArtifact(
        path=str(path),
        role="sft",
        base_model=base.base_model,
        digest=sha256_dir(path),
        metrics=metrics,
        steps=trainer.state.global_step,
        trust_remote_code=base.trust_remote_code,
    )
