"""The judge: a second reward model, trained on preference pairs the proxy reward model never saw and
never an RL reward, that decides the win rates and catches a policy exploiting the proxy (the
proxy/gold setup of Gao et al. 2022, "Scaling laws for reward model overoptimization")."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tasks.align import align_policy, check_guard
from tasks.evaluate import evaluate_models
from tasks.reward import check_reward_model, train_judge_model
from tasks.scoring import wins
from tunegate.artifacts import ModelArtifact
from tunegate.config import AlignSection, RewardSection
from tunegate.errors import StageGateFailed


@pytest.fixture(scope="module")
def judge(stage_inputs, tmp_path_factory) -> ModelArtifact:
    cfg, base, dataset, _ = stage_inputs
    return train_judge_model(cfg.reward, dataset, base, out_dir=tmp_path_factory.mktemp("judge"), seed=1)


@pytest.fixture(scope="module")
def reversed_proxy(judge, tmp_path_factory) -> ModelArtifact:
    """A sabotaged proxy: the judge with its score head negated, the limit of a proxy trained on flipped
    labels. Whatever raises its score lowers the judge's by exactly as much."""
    out = tmp_path_factory.mktemp("proxy") / "model"
    shutil.copytree(judge.path, out)
    weights = load_file(out / "model.safetensors")
    weights["score.weight"] = -weights["score.weight"]
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return judge.model_copy(update={"path": str(out), "role": "reward", "digest": "reversed"})


def test_the_judge_trains_on_its_own_pairs_and_is_checked_on_the_held_out_ones(stage_inputs, judge):
    _, _, dataset, _ = stage_inputs
    assert judge.role == "judge" and judge.steps == 2
    assert judge.metrics["train_pairs"] == dataset.splits["pref_judge"].rows > 0
    assert judge.metrics["eval_pairs"] == dataset.splits["pref_eval"].rows
    assert judge.metrics["weights_delta"] > 0


def test_a_judge_below_the_floor_is_rejected_naming_the_judge():
    m = {"pair_accuracy": 0.5, "eval_pairs": 20.0, "length_bias": 0.0, "longer_preferred": 0.5}
    m |= {"labels_longer": 0.5, "pairs_chosen_shorter": 0.0}
    with pytest.raises(StageGateFailed, match=r"^judge rejected: .*below reward.min_accuracy=70%.*Win rates"):
        check_reward_model(RewardSection(), m, "judge")
    with pytest.raises(StageGateFailed, match=r"^reward model rejected before alignment"):
        check_reward_model(RewardSection(), m)


def test_a_judge_without_pairs_says_how_to_get_some(stage_inputs, tmp_path):
    cfg, base, dataset, _ = stage_inputs
    splits = {k: v for k, v in dataset.splits.items() if k != "pref_judge"}
    with pytest.raises(
        StageGateFailed, match="judge model has no preference pairs.*raise build.judge_fraction"
    ):
        train_judge_model(
            cfg.reward, dataset.model_copy(update={"splits": splits}), base, out_dir=tmp_path, seed=1
        )


def test_the_guard_trips_when_the_proxy_rises_as_the_judge_falls():
    cfg = AlignSection()  # max_judge_drop 0.2
    base = {"guard.sft.eval_loss": 1.0, "guard.sft.answer_tokens": 20.0, "guard.sft.reward": 0.5}
    base |= {"guard.aligned.eval_loss": 1.0, "guard.aligned.answer_tokens": 20.0, "guard.sft.judge": 0.3}
    with pytest.raises(
        StageGateFailed,
        match=r"the proxy reward rose 0.500 -> 2.000 while the judge's score fell 0.300 -> -0.200 "
        r"\(by 0.500, above align.guard.max_judge_drop=0.2\)",
    ) as exc:
        check_guard(cfg, {**base, "guard.aligned.reward": 2.0, "guard.aligned.judge": -0.2})
    assert exc.value.details["guard.aligned.judge"] == -0.2
    check_guard(cfg, {**base, "guard.aligned.reward": 2.0, "guard.aligned.judge": 0.9})  # both agree: better
    check_guard(cfg, {**base, "guard.aligned.reward": 2.0, "guard.aligned.judge": 0.15})  # within tolerance
    check_guard(cfg, {**base, "guard.aligned.reward": 0.4, "guard.aligned.judge": -0.2})  # worse, not hacking
    no_judge = {k: v for k, v in base.items() if "judge" not in k}
    check_guard(cfg, {**no_judge, "guard.aligned.reward": 2.0})  # no judge: the loss and length checks only


def _sabotaged(align: AlignSection, max_eval_loss_increase: float | None = None, **changes) -> AlignSection:
    """GRPO that follows its reward hard on the tiny model (high learning rate, no KL, 16 completions a
    step), without the prompts' checks, and a guard with no judge tolerance."""
    guard = {**align.guard.model_dump(), "max_judge_drop": 0.0}
    if max_eval_loss_increase is not None:
        guard["max_eval_loss_increase"] = max_eval_loss_increase
    settings = {"learning_rate": 0.02, "beta": 0.0, "max_steps": 4, "per_device_train_batch_size": 16}
    settings |= {"num_generations": 8, "check_reward_weight": 0.0, "guard": guard}
    return AlignSection.model_validate({**align.model_dump(), **settings, **changes})


def test_a_policy_trained_on_a_sabotaged_proxy_is_caught_by_the_judge(
    stage_inputs, judge, reversed_proxy, tmp_path
):
    """Real GRPO on the tiny model against the reversed proxy: the proxy's score of the held-out greedy
    answers rises, the judge's falls, and the guard stops the stage naming both. A high learning rate,
    16 completions a step and 4 steps make the policy follow its reward: the guard tripped in each of
    18 runs tried (seeds 1-6; learning rate 1e-2 to 3e-2, 4 to 8 steps), and seed 3 moves the greedy
    answers far (proxy 0.051 -> 0.064). The tolerance is 0: two-step reward models on a random
    backbone score within ±0.1."""
    cfg, base, dataset, _ = stage_inputs
    sabotaged = _sabotaged(cfg.align, max_completion_length=4)  # the proxy alone drives the policy
    out = tmp_path / "align"
    with pytest.raises(
        StageGateFailed,
        match=r"the proxy reward rose \S+ -> \S+ while the judge's score fell \S+ -> \S+ \(by",
    ) as exc:
        align_policy(sabotaged, dataset, base, reversed_proxy, judge, out_dir=out, seed=3)
    f = exc.value.details
    assert (
        f["guard.aligned.reward"] > f["guard.sft.reward"] and f["guard.aligned.judge"] < f["guard.sft.judge"]
    )
    assert f["guard.sft.judge"] == pytest.approx(-f["guard.sft.reward"], abs=1e-5)  # the judge, reversed
    assert not (out / "model").exists()  # nothing saved for registration


def pays_for_length(prompts, completions, **columns) -> list[float]:
    """A sabotaged rule reward (TRL's signature): characters written, whatever they say."""
    return [len(c[-1]["content"]) / 10 for c in completions]


def test_a_policy_paid_for_length_by_a_rule_reward_is_caught_by_the_guard(stage_inputs, judge, tmp_path):
    """Real GRPO on the tiny model rewarded only by a rule that pays for characters (the reward model's
    weight 0): the guard scores what the policy was trained on, rule included, sees it rise and the
    held-out judge's score or loss degrade, and stops the stage naming both."""
    cfg, base, dataset, _ = stage_inputs
    sabotaged = _sabotaged(
        cfg.align,
        max_completion_length=8,
        rule_rewards=["tests.test_judge.pays_for_length"],
        trl_args={"reward_weights": [0.0, 1.0]},  # the reward model weighs nothing: the rule alone
        max_eval_loss_increase=0.05,
    )
    out = tmp_path / "align"
    proxy = judge.model_copy(update={"role": "reward"})  # any reward model: it weighs 0
    with pytest.raises(
        StageGateFailed, match=r"the reward it was trained on \(with rule rewards\) rose \S+ -> \S+ while"
    ) as exc:
        align_policy(sabotaged, dataset, base, proxy, judge, out_dir=out, seed=3)
    f = exc.value.details
    assert f["guard.aligned.optimised"] > f["guard.sft.optimised"]
    assert not (out / "model").exists()


def test_win_rates_come_from_the_judge_and_need_one(stage_inputs, judge, reversed_proxy, tmp_path):
    cfg, base, dataset, _ = stage_inputs
    candidate = _perturbed(base, tmp_path / "candidate")  # other answers than the base's
    models = {"base": base, "candidate": candidate}
    report = evaluate_models(
        cfg.evaluate, dataset, models, reversed_proxy, judge, out_dir=tmp_path / "e", seed=1
    )
    values = json.loads(Path(report.per_row_path).read_text())["values"]
    for label in models:  # the proxy's score and the judge's, side by side
        assert values[label]["reward_score"] == pytest.approx(
            [-x for x in values[label]["judge_score"]], abs=1e-5
        )
    by_judge = wins(values["candidate"]["judge_score"], values["base"]["judge_score"])
    by_proxy = wins(values["candidate"]["reward_score"], values["base"]["reward_score"])
    assert values["candidate"]["win_rate_vs_base"] == by_judge != by_proxy
    assert report.scores["candidate"]["win_rate_vs_base"] == pytest.approx(sum(by_judge) / len(by_judge))

    no_judge = evaluate_models(
        cfg.evaluate, dataset, models, reversed_proxy, None, out_dir=tmp_path / "n", seed=1
    )
    assert "reward_score" in no_judge.scores["candidate"]
    assert not {"judge_score", "win_rate_vs_base"} & set(no_judge.scores["candidate"])


def _perturbed(base: ModelArtifact, out: Path) -> ModelArtifact:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base.path)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base.path).save_pretrained(out)
    return base.model_copy(update={"path": str(out), "role": "align", "digest": "perturbed"})
