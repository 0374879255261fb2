"""Stage 3: supervised fine-tuning with TRL's SFTTrainer and a LoRA adapter.

The dataset is conversational prompt-completion, so the loss falls only on the assistant's answer
(and its end-of-turn token) whatever the chat template. The adapter is merged into full weights so
the next stages, the registry and serving all load one plain model directory.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from tasks.training import (
    finite_loss_guard,
    load_causal_lm,
    lora_config,
    require_trained,
    save_model_atomic,
    seed_everything,
    trl_kwargs,
)
from tunegate.artifacts import InstructionDataset, ModelArtifact, sha256_dir
from tunegate.config import SftSection
from tunegate.errors import TrainingError

log = logging.getLogger(__name__)


def train_sft(
    cfg: SftSection, data: InstructionDataset, base: ModelArtifact, *, out_dir: Path, seed: int
) -> ModelArtifact:
    """Fine-tune `base` on the SFT split; return the merged model with its train/eval losses.

    Raises:
        TrainingError: the loss became NaN/inf, or the adapter did not change.
    """
    seed_everything(seed)
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    train = Dataset.from_parquet(data.splits["sft_train"].path)
    evalset = Dataset.from_parquet(data.splits["sft_eval"].path) if data.splits["sft_eval"].rows else None
    model, tokenizer = load_causal_lm(base.path)
    args = SFTConfig(**trl_kwargs(cfg, out_dir, seed), max_length=cfg.max_length)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evalset,
        processing_class=tokenizer,
        peft_config=lora_config(cfg.lora, "CAUSAL_LM", model),
        callbacks=[finite_loss_guard()],
    )
    result = trainer.train()
    delta = require_trained(trainer.model, "sft")
    metrics = {"train_loss": float(result.training_loss), "lora_delta_norm": delta}
    if evalset is not None:
        metrics["eval_loss"] = float(trainer.evaluate()["eval_loss"])
    if not all(math.isfinite(v) for v in metrics.values()):
        raise TrainingError(f"sft: non-finite metrics after training: {metrics}")

    path = out_dir / "model"
    save_model_atomic(trainer.model.merge_and_unload(), tokenizer, path)
    log.info("sft done: %s", metrics)
    return ModelArtifact(
        path=str(path),
        role="sft",
        base_model=base.base_model,
        digest=sha256_dir(path),
        metrics=metrics,
        steps=trainer.state.global_step,
    )
