"""Stage 5: alignment of the SFT policy.

- `grpo` / `rloo`: online RL with TRL's GRPOTrainer or RLOOTrainer, scored by the trained reward model
  plus optional rule rewards (plain functions named by dotted import path, TRL's reward signature),
  plus a verifiable reward when RL prompts carry checks as eval rows do: the fraction of its row's
  checks a completion passes, scored by evaluation's own code (`tasks.scoring.check_reward`), weighted
  by `align.check_reward_weight` through TRL's `reward_weights`, logged as `rewards/row_checks/mean`.
- `dpo`: TRL's DPOTrainer, offline on the preference pairs; no reward model.

With adapters, the frozen SFT weights (adapter off) are the KL reference, so no second copy is held.
TRL logs reward, KL, completion length and entropy every `logging_steps` to the stage's MLflow run.
Afterwards a reward-hacking guard compares the aligned policy with the SFT policy on held-out data:
the proxy reward up while held-out loss or answer length degrade beyond the configured bounds, or
while the judge's score falls (a reward model trained on pairs the proxy never saw, never a reward
here), fails the stage.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from pathlib import Path

from data_checks.formats import CHECKS
from tasks.checkpoints import finish_checkpoints, train_resumable
from tasks.evaluate import completion_loss, generate_answers
from tasks.lm_head import use_dense_on_cpu
from tasks.model_io import load_causal_lm, save_policy
from tasks.reward import load_reward_model, score_conversations
from tasks.scoring import check_reward
from tasks.telemetry import training_telemetry
from tasks.trainer_args import trainer_config
from tasks.training import (
    finite_loss_guard,
    peft_for,
    require_mode_supported,
    require_trained,
    seed_everything,
    weights_fingerprint,
)
from tunegate.artifacts import InstructionDataset, ModelArtifact, sha256_dir
from tunegate.config import AlignSection, EvaluateSection
from tunegate.errors import ConfigError, StageGateFailed

log = logging.getLogger(__name__)


def align_policy(
    cfg: AlignSection,
    data: InstructionDataset,
    policy: ModelArtifact,
    reward: ModelArtifact | None,
    judge: ModelArtifact | None = None,
    *,
    out_dir: Path,
    seed: int,
    checkpoint_dir: Path | None = None,
    brand_prefix: str | None = None,
    brand_suffix: str | None = None,
    refusal_markers: list[str] | None = None,
) -> ModelArtifact:
    """Align `policy` (GRPO/RLOO against `reward`, rule rewards and the prompts' checks, or DPO on the
    pairs).

    Args:
        reward: the proxy reward model online RL optimises (grpo, rloo).
        judge: the judge reward model, for the reward-hacking guard only; None: no judge check.
        brand_prefix, brand_suffix, refusal_markers: evaluation's settings of the same names, so that
            the prompts' checks reward exactly what evaluation scores.

    Raises:
        ConfigError: a rule reward cannot be imported; an online method without a reward model;
            `trl_args` that TRL or tunegate refuse.
        StageGateFailed: the reward-hacking guard tripped.
        TrainingError: NaN/inf loss, or nothing trained.
    """
    require_mode_supported(cfg, "align")
    seed_everything(seed)
    from datasets import Dataset

    checkpoint_dir = checkpoint_dir or out_dir / "trainer"
    args = trainer_config("align", cfg, output_dir=checkpoint_dir, seed=seed)
    model, tokenizer = load_causal_lm(policy.path, trust_remote_code=policy.trust_remote_code)
    peft_config = peft_for(cfg, "CAUSAL_LM", model)
    before = None if peft_config is not None else weights_fingerprint(model)
    use_dense_on_cpu()  # TRL's tiled LM head is slow on a CPU (tasks/lm_head.py)
    reward_model = reward_tokenizer = None
    telemetry = training_telemetry("align", out_dir / "progress.json")
    if cfg.method == "dpo":
        from trl import DPOTrainer

        trainer = DPOTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_parquet(data.splits["pref_train"].path),
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[finite_loss_guard(), telemetry],
        )
    else:
        if reward is None:
            raise ConfigError([f"align.method={cfg.method} needs a trained reward model"])
        # The check columns stay: TRL hands a dataset's other columns to every reward function.
        prompts = Dataset.from_parquet(data.splits["prompts"].path)
        reward_model, reward_tokenizer = load_reward_model(
            reward.path, trust_remote_code=reward.trust_remote_code
        )
        checks = check_reward(brand_prefix, brand_suffix, refusal_markers)
        funcs, args.reward_weights = reward_functions(cfg, prompts, reward_model, args.reward_weights, checks)
        trainer = _online_trainer(cfg.method)(
            model=model,
            reward_funcs=funcs,
            args=args,
            train_dataset=prompts,
            processing_class=tokenizer,
            reward_processing_classes=[reward_tokenizer, *[None] * (len(funcs) - 1)],
            peft_config=peft_config,
            callbacks=[finite_loss_guard(), telemetry],
        )
    _, resumed, checkpoint_dir = train_resumable(trainer, checkpoint_dir)
    delta = require_trained(trainer.model, cfg.method, before)
    metrics = {
        "weights_delta": delta,
        "resumed_from_step": float(resumed),
        **_summarise(trainer.state.log_history),
        **telemetry.totals(),
    }
    if cfg.guard.enabled:
        proxy = (reward_model, reward_tokenizer) if reward_model is not None else None
        # The rule rewards with their weights: the guard scores what the policy was rewarded for.
        rules = [] if cfg.method == "dpo" else _rules_weighed(funcs, args.reward_weights)
        metrics.update(reward_hacking_guard(cfg, data, policy, trainer.model, tokenizer, proxy, judge, rules))
    path = out_dir / "model"
    save_policy(trainer, tokenizer, path, cfg.save, policy)
    finish_checkpoints(checkpoint_dir)
    log.info("%s done: %s", cfg.method, metrics)
    return ModelArtifact(
        path=str(path),
        role="align",
        base_model=policy.base_model,
        digest=sha256_dir(path),
        metrics=metrics,
        steps=trainer.state.global_step,
        trust_remote_code=policy.trust_remote_code,
    )


def reward_functions(
    cfg: AlignSection,
    prompts,
    reward_model,
    trl_weights: list[float] | None,
    checks: Callable[..., list[float | None]],
) -> tuple[list, list[float] | None]:
    """The online trainers' reward functions and TRL's `reward_weights` for them: the reward model, the
    rule rewards, then `checks` when some prompt carries a check and `align.check_reward_weight` is
    above 0.

    Args:
        prompts: the prompts split (a `datasets.Dataset`); check columns may be absent or all null.
        trl_weights: `align.trl_args.reward_weights` if set, weighing the reward model and rule rewards
            (one weight each: `AlignSection` checks it).
        checks: the row-checks reward function (`tasks.scoring.check_reward`).

    Returns:
        The functions, and their weights (None: TRL weighs each 1).

    Raises:
        ConfigError: a rule reward cannot be imported.
    """
    funcs = [reward_model, *(_import_reward(p) for p in cfg.rule_rewards)]
    checked = _checked_rows(prompts)
    if not checked or cfg.check_reward_weight == 0:
        if checked:
            log.info("%d prompts carry checks; align.check_reward_weight=0 leaves them out", checked)
        return funcs, trl_weights
    log.info(
        "verifiable reward: %d of %d prompts carry checks, weight %g",
        checked,
        len(prompts),
        cfg.check_reward_weight,
    )
    weights = trl_weights if trl_weights is not None else [1.0] * len(funcs)
    return [*funcs, checks], [*weights, cfg.check_reward_weight]


def _rules_weighed(funcs: list, weights: list[float] | None) -> list[tuple[Callable, float]]:
    """The reward model's weight (as "model") and each rule reward with its weight; the prompts' checks
    are left out (held-out SFT rows carry none)."""
    weights = weights if weights is not None else [1.0] * len(funcs)
    named = [("model", weights[0])]
    return named + [
        (f, w)
        for f, w in zip(funcs[1:], weights[1:], strict=True)
        if getattr(f, "__name__", "") != "row_checks"
    ]


def _checked_rows(prompts) -> int:
    """Prompt rows that carry at least one check (a split built before prompts had checks has none)."""
    present = [c for c in CHECKS if c in prompts.column_names]
    if not present:
        return 0
    return sum(any(values) for values in zip(*(prompts[c] for c in present), strict=True))


def reward_hacking_guard(
    cfg: AlignSection,
    data: InstructionDataset,
    sft: ModelArtifact,
    aligned,
    tokenizer,
    proxy: tuple | None,
    judge: ModelArtifact | None = None,
    rules: list[tuple[Callable | str, float]] | None = None,
) -> dict[str, float]:
    """Compare SFT and aligned policies on held-out SFT rows: loss on the reference answers, length of
    greedy answers, and each scorer's mean score of those answers. Proxy reward up while loss or length
    degrade beyond the bounds, or while the judge's score falls, means the policy is exploiting the
    proxy: the stage fails.

    Args:
        proxy: (reward model, its tokenizer), the proxy online methods optimised; None for dpo.
        judge: the judge's record, loaded here (the trainer never holds it); None: no judge check.
            Figures `guard.{sft,aligned}.reward` and `.judge`.
        rules: what the policy was rewarded with (`_rules_weighed`): "model" (the proxy reward model)
            and rule rewards, each with its weight. With any rule reward, their weighted sum per answer
            is `guard.{sft,aligned}.optimised`, and that is the reward whose rise the guard tests: a
            rule that pays for length or a phrase counts as much as the reward model.

    Raises:
        StageGateFailed: the guard tripped; the figures are in `details`.
    """
    from datasets import Dataset

    rows = list(Dataset.from_parquet(data.splits["sft_eval"].path))
    if not rows:
        log.warning("reward-hacking guard skipped: no held-out SFT rows")
        return {}
    prompts = [r["prompt"] for r in rows[: cfg.guard.prompts]]
    scorers = {"reward": proxy} if proxy is not None else {}
    if judge is not None:
        judge_model, judge_tokenizer = load_reward_model(
            judge.path, trust_remote_code=judge.trust_remote_code
        )
        scorers["judge"] = (judge_model.to(next(aligned.parameters()).device), judge_tokenizer)
    gen = EvaluateSection(max_new_tokens=cfg.max_completion_length, batch_size=16)
    sft_model, _ = load_causal_lm(sft.path, trust_remote_code=sft.trust_remote_code)
    figures: dict[str, float] = {}
    for label, model in (("sft", sft_model), ("aligned", aligned)):
        model.eval()
        answers, n_tokens = generate_answers(model, tokenizer, prompts, gen)
        figures[f"guard.{label}.eval_loss"] = completion_loss(model, tokenizer, rows[:64])
        figures[f"guard.{label}.answer_tokens"] = n_tokens / len(prompts)
        convs = [p + [{"role": "assistant", "content": a}] for p, a in zip(prompts, answers, strict=True)]
        per_answer: dict[str, list[float]] = {}
        for name, (scorer, scorer_tokenizer) in scorers.items():
            per_answer[name] = score_conversations(scorer, scorer_tokenizer, convs)
            figures[f"guard.{label}.{name}"] = sum(per_answer[name]) / len(prompts)
        if any(not isinstance(rule, str) for rule, _ in rules or []):
            figures[f"guard.{label}.optimised"] = _optimised(
                rules, per_answer.get("reward"), prompts, answers
            )
    del sft_model
    check_guard(cfg, figures)
    return figures


def _optimised(rules, model_scores: list[float] | None, prompts, answers: list[str]) -> float:
    """Mean over the answers of the weighted reward the policy was trained on: the reward model's score
    and each rule reward called as TRL calls it (conversational completions); None counts 0."""
    completions = [[{"role": "assistant", "content": a}] for a in answers]
    total = [0.0] * len(answers)
    for rule, weight in rules:
        values = model_scores if rule == "model" else rule(prompts=prompts, completions=completions)
        for i, v in enumerate(values or []):
            total[i] += weight * (v or 0.0)
    return sum(total) / len(total)


def check_guard(cfg: AlignSection, f: dict[str, float]) -> None:
    """The guard's decision on its figures (see `reward_hacking_guard`).

    Raises:
        StageGateFailed: the proxy reward rose (or there is none, as with dpo) while held-out loss or
            answer length degraded beyond their bounds, or the proxy rose while the judge's score fell
            by more than `align.guard.max_judge_drop`; the message names the figures.
    """
    g = cfg.guard
    proxy = "guard.sft.reward" in f
    rewarded = "optimised" if "guard.sft.optimised" in f else "reward"  # with rule rewards: all of it
    reward_up = not proxy or f[f"guard.aligned.{rewarded}"] > f[f"guard.sft.{rewarded}"]
    loss_up = f["guard.aligned.eval_loss"] - f["guard.sft.eval_loss"]
    ratio = f["guard.aligned.answer_tokens"] / max(f["guard.sft.answer_tokens"], 1e-9)
    problems = []
    if proxy and "guard.sft.judge" in f:
        drop = f["guard.sft.judge"] - f["guard.aligned.judge"]
        if drop > g.max_judge_drop:
            problems.append(
                f"the judge's score fell {f['guard.sft.judge']:.3f} -> {f['guard.aligned.judge']:.3f} "
                f"(by {drop:.3f}, above align.guard.max_judge_drop={g.max_judge_drop:g})"
            )
    if loss_up > g.max_eval_loss_increase:
        problems.append(
            f"held-out loss rose by {loss_up:.3f} (from {f['guard.sft.eval_loss']:.3f}), above "
            f"align.guard.max_eval_loss_increase={g.max_eval_loss_increase:g}"
        )
    if ratio > g.max_length_ratio:
        problems.append(
            f"answers grew {ratio:.2f}x ({f['guard.sft.answer_tokens']:.0f} -> "
            f"{f['guard.aligned.answer_tokens']:.0f} tokens), above align.guard.max_length_ratio={g.max_length_ratio:g}"
        )
    if reward_up and problems:
        what = (
            "the proxy reward" if rewarded == "reward" else "the reward it was trained on (with rule rewards)"
        )
        rose = (
            f"{what} rose {f[f'guard.sft.{rewarded}']:.3f} -> {f[f'guard.aligned.{rewarded}']:.3f} while "
            if proxy
            else ""
        )
        raise StageGateFailed(
            f"reward-hacking guard: {rose}" + "; ".join(problems) + ". The aligned policy is not registered. "
            "Raise align.beta (stronger KL), lower the learning rate or steps, or fix the proxy reward "
            "model (its pairs, pref_train).",
            details=f,
        )


def _online_trainer(method: str):
    from trl import GRPOTrainer, RLOOTrainer

    return GRPOTrainer if method == "grpo" else RLOOTrainer


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
    """First and last logged reward, row-checks reward, KL, completion length and entropy (DPO:
    reward margin)."""
    out: dict[str, float] = {}
    for key, name in (
        ("reward", "reward"),
        ("rewards/row_checks/mean", "row_checks"),
        ("rewards/margins", "reward_margin"),
    ):
        # TRL logs None for a step in which no prompt carried a check.
        logged = [h for h in history if h.get(key) is not None]
        if logged:
            out[f"{name}_first"] = float(logged[0][key])
            out[f"{name}_last"] = float(logged[-1][key])
    last = next((h for h in reversed(history) if "loss" in h or "reward" in h), {})
    for key, name in (
        ("kl", "kl_last"),
        ("completions/mean_length", "completion_length_last"),
        ("entropy", "entropy_last"),
    ):
        if key in last:
            out[name] = float(last[key])
    return out
