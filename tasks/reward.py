"""Stage 4: a reward model trained with TRL's RewardTrainer on preference pairs.

Starts from the SFT model (it already speaks the domain) with a scalar head. Before RL may use it,
it must rank held-out pairs correctly at least `min_accuracy` of the time.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tasks.training import (
    finite_loss_guard,
    lora_config,
    on_cuda,
    require_trained,
    save_model_atomic,
    seed_everything,
    trl_kwargs,
)
from tunegate.artifacts import InstructionDataset, ModelArtifact, sha256_dir
from tunegate.config import RewardSection
from tunegate.errors import StageGateFailed

log = logging.getLogger(__name__)


def train_reward_model(
    cfg: RewardSection, data: InstructionDataset, backbone: ModelArtifact, *, out_dir: Path, seed: int
) -> ModelArtifact:
    """Train a reward model; return it with held-out pairwise accuracy and length bias.

    Raises:
        StageGateFailed: held-out accuracy below `cfg.min_accuracy` (nothing downstream runs).
        TrainingError: NaN/inf loss, or nothing trained.
    """
    seed_everything(seed)
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    train = Dataset.from_parquet(data.splits["pref_train"].path)
    held_out = Dataset.from_parquet(data.splits["pref_eval"].path)
    model, tokenizer = _setup_model(backbone.path)
    args = RewardConfig(**trl_kwargs(cfg, out_dir, seed), max_length=cfg.max_length)
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=lora_config(cfg.lora, "SEQ_CLS", model),
        callbacks=[finite_loss_guard()],
    )
    result = trainer.train()
    delta = require_trained(trainer.model, "reward")
    merged = trainer.model.merge_and_unload()
    accuracy, length_pref = pairwise_accuracy(merged, tokenizer, list(held_out))
    metrics = {
        "train_loss": float(result.training_loss),
        "pair_accuracy": accuracy,
        "longer_preferred": length_pref,
        "lora_delta_norm": delta,
        "eval_pairs": float(len(held_out)),
    }
    log.info("reward model: %s", metrics)
    if accuracy < cfg.min_accuracy:
        raise StageGateFailed(
            f"reward model ranks {accuracy:.1%} of {len(held_out)} held-out pairs correctly, below "
            f"reward.min_accuracy={cfg.min_accuracy:.0%}; alignment would optimise noise. Add or clean "
            "preference pairs, or train longer (reward.max_steps).",
            details=metrics,
        )
    path = out_dir / "model"
    save_model_atomic(merged, tokenizer, path)
    return ModelArtifact(
        path=str(path),
        role="reward",
        base_model=backbone.base_model,
        digest=sha256_dir(path),
        metrics=metrics,
        steps=trainer.state.global_step,
    )


def pairwise_accuracy(model, tokenizer, pairs: list[dict], batch_size: int = 16) -> tuple[float, float]:
    """Share of pairs where chosen outscores rejected, and share where the longer answer wins."""
    if not pairs:
        return 0.0, 0.0
    chosen = score_conversations(model, tokenizer, [p["prompt"] + p["chosen"] for p in pairs], batch_size)
    rejected = score_conversations(model, tokenizer, [p["prompt"] + p["rejected"] for p in pairs], batch_size)
    correct = sum(c > r for c, r in zip(chosen, rejected, strict=True))
    longer_wins = 0
    for p, c, r in zip(pairs, chosen, rejected, strict=True):
        chosen_longer = len(p["chosen"][-1]["content"]) >= len(p["rejected"][-1]["content"])
        longer_wins += (c > r) == chosen_longer
    return correct / len(pairs), longer_wins / len(pairs)


def score_conversations(
    model, tokenizer, conversations: list[list[dict]], batch_size: int = 16
) -> list[float]:
    """Reward-model scores for full conversations (prompt plus answer)."""
    import torch

    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    scores: list[float] = []
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(
                texts[i : i + batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=1024,
                add_special_tokens=False,
            ).to(device)
            scores += model(**enc).logits[:, 0].float().tolist()
    return scores


def load_reward_model(path: str):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _setup_model(path: str):
    import torch

    model, tokenizer = load_reward_model(path)
    if on_cuda():
        model = model.to(torch.bfloat16)
    return model, tokenizer
