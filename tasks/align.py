"""Stage 5: online RL with TRL's GRPOTrainer or RLOOTrainer, scored by the trained reward model.

Rollouts are sampled from the SFT model with a LoRA adapter; the frozen SFT weights (adapter off)
are the KL reference, so no second model copy is held in memory. Optional rule rewards are plain
functions named by dotted import path, with TRL's reward-function signature.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from pathlib import Path

from tasks.reward import load_reward_model
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
from tunegate.config import AlignSection
from tunegate.errors import ConfigError

log = logging.getLogger(__name__)


def align_policy(
    cfg: AlignSection,
    data: InstructionDataset,
    policy: ModelArtifact,
    reward: ModelArtifact,
    *,
    out_dir: Path,
    seed: int,
) -> ModelArtifact:
    """Optimise `policy` against `reward` (plus rule rewards) on the RL prompts.

    Raises:
        ConfigError: a rule reward cannot be imported.
        TrainingError: NaN/inf loss, or nothing trained.
    """
    seed_everything(seed)
    from datasets import Dataset

    rules = [_import_reward(p) for p in cfg.rule_rewards]
    prompts = Dataset.from_parquet(data.splits["prompts"].path).select_columns(["prompt"])
    model, tokenizer = load_causal_lm(policy.path)
    reward_model, reward_tokenizer = load_reward_model(reward.path)
    trainer_cls, config_cls = _trainer(cfg.method)
    args = config_cls(
        **trl_kwargs(cfg, out_dir, seed),
        num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length,
        beta=cfg.beta,
        temperature=cfg.temperature,
    )
    trainer = trainer_cls(
        model=model,
        reward_funcs=[reward_model, *rules],
        args=args,
        train_dataset=prompts,
        processing_class=tokenizer,
        reward_processing_classes=[reward_tokenizer, *[None] * len(rules)],
        peft_config=lora_config(cfg.lora, "CAUSAL_LM", model),
        callbacks=[finite_loss_guard()],
    )
    trainer.train()
    delta = require_trained(trainer.model, cfg.method)
    metrics = {"lora_delta_norm": delta, **_summarise(trainer.state.log_history)}
    path = out_dir / "model"
    save_model_atomic(trainer.model.merge_and_unload(), tokenizer, path)
    log.info("%s done: %s", cfg.method, metrics)
    return ModelArtifact(
        path=str(path),
        role="align",
        base_model=policy.base_model,
        digest=sha256_dir(path),
        metrics=metrics,
        steps=trainer.state.global_step,
    )


def _trainer(method: str):
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    return (GRPOTrainer, GRPOConfig) if method == "grpo" else (RLOOTrainer, RLOOConfig)


def _import_reward(dotted: str) -> Callable:
    module, _, name = dotted.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError([f"align.rule_rewards: cannot import {dotted!r} ({exc})"]) from exc
    if not callable(fn):
        raise ConfigError([f"align.rule_rewards: {dotted!r} is not callable"])
    return fn


def _summarise(history: list[dict]) -> dict[str, float]:
    """First and last logged reward, KL and completion length: the shape of the run at a glance."""
    logged = [h for h in history if "reward" in h]
    if not logged:
        return {}
    out = {"reward_first": float(logged[0]["reward"]), "reward_last": float(logged[-1]["reward"])}
    for key, name in (
        ("kl", "kl_last"),
        ("completions/mean_length", "completion_length_last"),
        ("entropy", "entropy_last"),
    ):
        if key in logged[-1]:
            out[name] = float(logged[-1][key])
    return out
