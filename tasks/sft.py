"""Stage 3: supervised fine-tuning with TRL's SFTTrainer.

Each conversation is tokenised here with the real chat template and its loss mask
(data_checks/masks.py): every assistant turn trains, or only the last (`train_on`), tool calls
included, never user, system or tool text. TRL takes the tokens with the mask (`input_ids`,
`assistant_masks`), turns it into labels and keeps them through truncation and packing; the first
training example is written with its trained tokens marked (`loss_mask.txt`). Tokenising here, not
in the build stage, keeps the built splits readable conversations and puts the tokenizer and
`train_on` where they are used.

What trains is the section's `mode`: LoRA or DoRA adapters, QLoRA on a 4-bit base (CUDA), all
weights, or only the top layers. Checkpoints let a killed stage resume; early stopping on eval loss
keeps the best model. The result is merged full weights or the adapter alone, per `save`.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from pathlib import Path

from data_checks.masks import MaskError, assistant_mask, show_mask
from tasks.checkpoints import finish_checkpoints, train_resumable
from tasks.lm_head import use_dense_on_cpu
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
from tunegate.errors import DataValidationError, TrainingError

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
        DataValidationError: conversations whose trained tokens cannot be located with this chat
            template (every one is counted before training starts).
        TrainingError: the loss became NaN/inf, or nothing changed.
    """
    require_mode_supported(cfg, "sft")
    seed_everything(seed)
    from transformers import EarlyStoppingCallback
    from trl import SFTTrainer

    checkpoint_dir = checkpoint_dir or out_dir / "trainer"
    args = trainer_config("sft", cfg, output_dir=checkpoint_dir, seed=seed)
    model, tokenizer = load_causal_lm(
        base.path,
        quantization_config(cfg),
        trust_remote_code=base.trust_remote_code,
        chat_template=base.chat_template,
    )
    train = _masked(data.splits["sft_train"].path, tokenizer, cfg.train_on, "sft_train")
    evalset = (
        _masked(data.splits["sft_eval"].path, tokenizer, cfg.train_on, "sft_eval")
        if data.splits["sft_eval"].rows
        else None
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
    use_dense_on_cpu()  # TRL's tiled LM head costs ~40% of a CPU step (tasks/lm_head.py)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evalset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    _write_mask_preview(trainer, tokenizer, out_dir / "loss_mask.txt")
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


def _masked(path: str, tokenizer, train_on: str, split: str):
    """A split's conversations as tokens with their loss mask: `input_ids` and `assistant_masks`
    (1 where a token trains), the pre-tokenised form TRL's SFTTrainer turns into labels.

    Raises:
        DataValidationError: rows whose mask cannot be computed, counted by cause, with samples.
    """
    from datasets import Dataset

    def tokenise(row: dict) -> dict:
        try:
            masked = assistant_mask(tokenizer, row["messages"], row["tools"], train_on)
        except MaskError as exc:
            return {"input_ids": [], "assistant_masks": [], "problem": str(exc)}
        return {"input_ids": masked.input_ids, "assistant_masks": masked.mask, "problem": ""}

    rows = Dataset.from_parquet(path)
    out = rows.map(tokenise, remove_columns=rows.column_names)
    problems = {i: p for i, p in enumerate(out["problem"]) if p}
    if problems:
        by_cause = Counter(problems.values())
        cause, count = by_cause.most_common(1)[0]
        first = next(i for i, p in problems.items() if p == cause)
        raise DataValidationError(
            f"sft: {len(problems)} of {len(rows)} {split} conversations cannot be masked with this chat "
            f"template (sft.train_on={train_on}); {count} as row {first}: {cause}"
            + (f" ({len(by_cause) - 1} other causes)" if len(by_cause) > 1 else "")
        )
    return out.remove_columns("problem")


def _write_mask_preview(trainer, tokenizer, path: Path) -> None:
    """The first training sequence as the trainer prepared it, its trained tokens inside `⟦ ⟧`
    (from its labels): what the loss actually falls on, after truncation and packing."""
    if not trainer.is_world_process_zero():
        return
    example = trainer.train_dataset[0]
    mask = [int(label != -100) for label in example["labels"]]
    preview = show_mask(tokenizer, example["input_ids"], mask)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(preview + "\n", encoding="utf-8")
    log.info("sft loss mask (trained tokens inside ⟦ ⟧) of the first training sequence:\n%s", preview)
