"""Stage 4: reward models trained with TRL's RewardTrainer on preference pairs.

Two of them, trained the same way on disjoint pairs (split by prompt, `tasks.build.preference_split`):
- the proxy (`train_reward_model`, on `pref_train`): the reward online RL optimises;
- the judge (`train_judge_model`, on `pref_judge`): never given to the RL trainer, so the policy cannot
  learn its quirks. It decides the win rates and checks the proxy in the reward-hacking guard: a proxy
  score that rises while the judge's falls is the policy exploiting the proxy (Gao et al. 2022,
  "Scaling laws for reward model overoptimization": a proxy reward model scored against a gold one).

Each starts from the SFT model (it already speaks the domain) or the backbone named in the config, with
a scalar head, and must pass the same checks on the held-out pairs (`pref_eval`): rank them correctly at
least `min_accuracy` of the time, and not simply reward length (it may not prefer the longer answer
markedly more often than the labels do, and must still be right when the chosen answer is shorter). A
length-biased judge would agree with a policy that games length, so the judge gets no looser bounds.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from tasks.checkpoints import finish_checkpoints, train_resumable
from tasks.model_io import save_policy
from tasks.telemetry import training_telemetry
from tasks.trainer_args import trainer_config
from tasks.training import (
    finite_loss_guard,
    on_cuda,
    peft_for,
    require_mode_supported,
    require_trained,
    seed_everything,
    weights_fingerprint,
)
from tunegate.artifacts import DataFile, InstructionDataset, ModelArtifact, sha256_dir
from tunegate.config import RewardSection
from tunegate.errors import StageGateFailed

log = logging.getLogger(__name__)


def train_reward_model(
    cfg: RewardSection,
    data: InstructionDataset,
    backbone: ModelArtifact,
    *,
    out_dir: Path,
    seed: int,
    checkpoint_dir: Path | None = None,
    split: str = "pref_train",
    role: Literal["reward", "judge"] = "reward",
) -> ModelArtifact:
    """Train a reward model; return it with held-out pairwise accuracy and length-bias figures.

    Args:
        split: the preference split it trains on (`pref_train` for the proxy, `pref_judge` for the
            judge); every reward model is checked on `pref_eval`.
        role: what the model is for: the proxy RL optimises (`reward`) or the judge (`judge`).

    Raises:
        ConfigError: mode=qlora without CUDA; `trl_args` that TRL or tunegate refuse.
        StageGateFailed: `split` holds no pairs; below `cfg.min_accuracy`, or length-biased (nothing
            downstream runs).
        TrainingError: NaN/inf loss, or nothing trained.
    """
    require_mode_supported(cfg, "reward")
    seed_everything(seed)
    from datasets import Dataset
    from trl import RewardTrainer

    checkpoint_dir = checkpoint_dir or out_dir / "trainer"
    args = trainer_config("reward", cfg, output_dir=checkpoint_dir, seed=seed)
    train = Dataset.from_parquet(_split(data, split, role).path)
    held_out = Dataset.from_parquet(data.splits["pref_eval"].path)
    model, tokenizer = _setup_model(backbone.path, backbone.trust_remote_code)
    peft_config = peft_for(cfg, "SEQ_CLS", model)
    before = None if peft_config is not None else weights_fingerprint(model)
    telemetry = training_telemetry(role, out_dir / "progress.json")
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[finite_loss_guard(), telemetry],
    )
    result, resumed, checkpoint_dir = train_resumable(trainer, checkpoint_dir)
    delta = require_trained(trainer.model, role, before)
    pairs = list(held_out)
    chosen, rejected = _pair_scores(trainer.model, tokenizer, pairs)
    metrics = {
        "train_loss": float(result.training_loss),
        "weights_delta": delta,
        "resumed_from_step": float(resumed),
        "train_pairs": float(len(train)),
        "eval_pairs": float(len(pairs)),
        **length_bias(pairs, chosen, rejected),
        **telemetry.totals(),
    }
    log.info("%s model (%s): %s", role, split, metrics)
    check_reward_model(cfg, metrics, role)
    path = out_dir / "model"
    save_policy(trainer, tokenizer, path, "merged", backbone)
    finish_checkpoints(checkpoint_dir)
    return ModelArtifact(
        path=str(path),
        role=role,
        base_model=backbone.base_model,
        digest=sha256_dir(path),
        metrics=metrics,
        steps=trainer.state.global_step,
        trust_remote_code=backbone.trust_remote_code,
    )


def train_judge_model(
    cfg: RewardSection,
    data: InstructionDataset,
    backbone: ModelArtifact,
    *,
    out_dir: Path,
    seed: int,
    checkpoint_dir: Path | None = None,
) -> ModelArtifact:
    """The judge: `train_reward_model` on `pref_judge`, with the proxy's settings and checks.

    Raises:
        as `train_reward_model`.
    """
    return train_reward_model(
        cfg,
        data,
        backbone,
        out_dir=out_dir,
        seed=seed,
        checkpoint_dir=checkpoint_dir,
        split="pref_judge",
        role="judge",
    )


def _split(data: InstructionDataset, split: str, role: str) -> DataFile:
    pairs = data.splits.get(split)
    if pairs is None or pairs.rows == 0:
        more = ", raise build.judge_fraction, or set it to 0 (no judge)" if role == "judge" else ""
        raise StageGateFailed(
            f"the {role} model has no preference pairs to train on: {split} is "
            f"{'empty' if pairs is not None else 'missing'}. Add preference pairs with more distinct "
            f"prompts{more}."
        )
    return pairs


def length_bias(pairs: list[dict], chosen: list[float], rejected: list[float]) -> dict[str, float]:
    """Held-out accuracy, and how the reward model treats length.

    - `pair_accuracy`: share of pairs where chosen outscores rejected;
    - `longer_preferred` / `labels_longer`: among pairs whose answers differ in length, how often the
      model prefers the longer answer, and how often the label does; `length_bias` is the difference;
    - `accuracy_chosen_shorter` over `pairs_chosen_shorter`: accuracy where the better answer is shorter.
    """
    n = len(pairs)
    wins = [c > r for c, r in zip(chosen, rejected, strict=True)]
    out = {"pair_accuracy": sum(wins) / n if n else 0.0}
    lengths = [(len(_answer(p["chosen"])), len(_answer(p["rejected"]))) for p in pairs]
    differ = [(w, lc > lr) for w, (lc, lr) in zip(wins, lengths, strict=True) if lc != lr]
    model_longer = sum(w == chosen_longer for w, chosen_longer in differ)
    labels_longer = sum(chosen_longer for _, chosen_longer in differ)
    out["longer_preferred"] = model_longer / len(differ) if differ else 0.0
    out["labels_longer"] = labels_longer / len(differ) if differ else 0.0
    out["length_bias"] = out["longer_preferred"] - out["labels_longer"]
    shorter = [w for w, chosen_longer in differ if not chosen_longer]
    out["pairs_chosen_shorter"] = float(len(shorter))
    if shorter:
        out["accuracy_chosen_shorter"] = sum(shorter) / len(shorter)
    return out


def check_reward_model(cfg: RewardSection, m: dict[str, float], role: str = "reward") -> None:
    """The gates a reward model passes before alignment may optimise against it (`role` reward), or
    before its preferences may judge the policy (`role` judge)."""
    problems = []
    if m["pair_accuracy"] < cfg.min_accuracy:
        problems.append(
            f"it ranks {m['pair_accuracy']:.1%} of {m['eval_pairs']:.0f} held-out pairs correctly, below "
            f"reward.min_accuracy={cfg.min_accuracy:.0%}"
        )
    if m["length_bias"] > cfg.max_length_bias:
        problems.append(
            f"it prefers the longer answer in {m['longer_preferred']:.0%} of pairs, the labels in "
            f"{m['labels_longer']:.0%}: length bias {m['length_bias']:+.2f} above "
            f"reward.max_length_bias={cfg.max_length_bias:g}"
        )
    if m["pairs_chosen_shorter"] >= cfg.length_check_min_pairs and (
        m["accuracy_chosen_shorter"] < cfg.min_accuracy_chosen_shorter
    ):
        problems.append(
            f"where the better answer is the shorter one it is right only {m['accuracy_chosen_shorter']:.0%} "
            f"of the time ({m['pairs_chosen_shorter']:.0f} pairs), below "
            f"reward.min_accuracy_chosen_shorter={cfg.min_accuracy_chosen_shorter:.0%}"
        )
    if not problems:
        return
    if role == "judge":
        what, why = "judge rejected", "Win rates and the reward-hacking guard would rest on noise or length"
        more = ", raise build.judge_fraction"
    else:
        what, why, more = (
            "reward model rejected before alignment",
            "Alignment would optimise noise or length",
            "",
        )
    raise StageGateFailed(
        f"{what}: " + "; ".join(problems) + f". {why}. Add or clean preference pairs (include pairs where "
        f"the better answer is shorter){more}, or train longer (reward.max_steps).",
        details=m,
    )


def _answer(messages: list[dict]) -> str:
    return messages[-1]["content"]


def _pair_scores(
    model, tokenizer, pairs: list[dict], batch_size: int = 16
) -> tuple[list[float], list[float]]:
    chosen = score_conversations(model, tokenizer, [p["prompt"] + p["chosen"] for p in pairs], batch_size)
    rejected = score_conversations(model, tokenizer, [p["prompt"] + p["rejected"] for p in pairs], batch_size)
    return chosen, rejected


def score_conversations(
    model, tokenizer, conversations: list[list[dict]], batch_size: int = 16
) -> list[float]:
    """Reward-model scores for full conversations (prompt plus answer)."""
    import torch

    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    # Batches of similar length: a forward pass pays for every padding position it carries.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    scores: list[float] = [0.0] * len(texts)
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            batch = order[i : i + batch_size]
            enc = tokenizer(
                [texts[j] for j in batch],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=1024,
                add_special_tokens=False,
            ).to(device)
            for j, score in zip(batch, model(**enc).logits[:, 0].float().tolist(), strict=True):
                scores[j] = score
    return scores


def load_reward_model(path: str, *, trust_remote_code: bool = False):
    """A sequence classifier with one output (the reward) and its tokenizer, fp32. Code shipped with
    the model runs only with `trust_remote_code`."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, dtype=torch.float32, trust_remote_code=trust_remote_code
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _setup_model(path: str, trust_remote_code: bool):
    import torch

    model, tokenizer = load_reward_model(path, trust_remote_code=trust_remote_code)
    if on_cuda():
        model = model.to(torch.bfloat16)
    return model, tokenizer
