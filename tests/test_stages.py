"""Each stage on the tiny model: two training steps, loss finite, weights moved; gate arithmetic."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tasks.align import align_policy
from tasks.evaluate import evaluate_models
from tasks.gates import apply_gates
from tasks.reward import train_reward_model
from tasks.scoring import brand_ok, fact_hit
from tasks.sft import train_sft
from tunegate.artifacts import EvalReport
from tunegate.config import GateSpec
from tunegate.errors import StageGateFailed, TrainingError


@pytest.fixture(scope="module")
def sft_model(stage_inputs):
    cfg, base, dataset, work = stage_inputs
    return train_sft(cfg.sft, dataset, base, out_dir=work / "sft", seed=1)


def _weights(path: str) -> dict[str, torch.Tensor]:
    return load_file(f"{path}/model.safetensors")


def _moved(a: str, b: str) -> bool:
    wa, wb = _weights(a), _weights(b)
    return any(not torch.equal(wa[k], wb[k]) for k in wa if k in wb)


def test_sft_trains_two_steps_and_changes_weights(stage_inputs, sft_model):
    _, base, _, _ = stage_inputs
    assert sft_model.steps == 2
    assert math.isfinite(sft_model.metrics["train_loss"]) and math.isfinite(sft_model.metrics["eval_loss"])
    assert sft_model.metrics["weights_delta"] > 0 and sft_model.metrics["train_tokens"] > 0
    assert _moved(base.path, sft_model.path)
    assert sft_model.digest != base.digest


def test_reward_model_trains_and_reports_accuracy(stage_inputs, sft_model):
    cfg, _, dataset, work = stage_inputs
    rm = train_reward_model(cfg.reward, dataset, sft_model, out_dir=work / "reward", seed=1)
    assert rm.steps == 2 and math.isfinite(rm.metrics["train_loss"])
    assert rm.metrics["eval_pairs"] == dataset.splits["pref_eval"].rows
    # The reported accuracy is what the saved model does on the held-out pairs, scored again here.
    from datasets import Dataset

    from tasks.reward import load_reward_model, score_conversations

    pairs = list(Dataset.from_parquet(dataset.splits["pref_eval"].path))
    model, tokenizer = load_reward_model(rm.path)
    chosen = score_conversations(model, tokenizer, [p["prompt"] + p["chosen"] for p in pairs])
    rejected = score_conversations(model, tokenizer, [p["prompt"] + p["rejected"] for p in pairs])
    right = sum(c > r for c, r in zip(chosen, rejected, strict=True))
    assert rm.metrics["pair_accuracy"] == pytest.approx(right / len(pairs), abs=1e-9)


def test_reward_model_below_floor_stops_the_run(stage_inputs, sft_model):
    cfg, _, dataset, work = stage_inputs
    strict = cfg.reward.model_copy(update={"min_accuracy": 1.0, "max_steps": 1})
    with pytest.raises(StageGateFailed, match="below reward.min_accuracy=100%"):
        train_reward_model(strict, dataset, sft_model, out_dir=work / "reward-strict", seed=1)
    assert not (work / "reward-strict" / "model").exists()


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_align_trains_against_the_reward_model(stage_inputs, sft_model, method):
    cfg, _, dataset, work = stage_inputs
    rm = train_reward_model(cfg.reward, dataset, sft_model, out_dir=work / f"reward-{method}", seed=1)
    align_cfg = cfg.align.model_copy(update={"method": method})
    policy = align_policy(align_cfg, dataset, sft_model, rm, out_dir=work / method, seed=1)
    assert policy.steps == 2 and policy.role == "align"
    assert "reward_last" in policy.metrics
    assert _moved(sft_model.path, policy.path)


def test_nan_loss_stops_sft_with_a_clear_error(stage_inputs):
    cfg, base, dataset, work = stage_inputs
    bad = cfg.sft
    # Poison the base weights so the very first logged loss is NaN.
    poisoned = work / "poisoned"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base.path)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(poisoned)
    AutoTokenizer.from_pretrained(base.path).save_pretrained(poisoned)
    art = base.model_copy(update={"path": str(poisoned)})
    with pytest.raises(TrainingError, match="loss became nan"):
        train_sft(bad, dataset, art, out_dir=work / "sft-nan", seed=1)
    assert not (work / "sft-nan" / "model").exists()


def test_evaluate_scores_every_model_on_the_same_prompts(stage_inputs, sft_model):
    cfg, base, dataset, work = stage_inputs
    report = evaluate_models(
        cfg.evaluate,
        dataset,
        {"base": base, "candidate": sft_model},
        None,
        out_dir=work / "eval",
        seed=1,
    )
    assert set(report.scores) == {"base", "candidate"}
    per_row = {"eval_loss", "task_accuracy", "fact_accuracy", "regex_match", "brand_format"}
    per_row |= {"canary_accuracy", "safety_refusal_rate"}
    for label, scores in report.scores.items():
        assert per_row | {"perplexity", "ms_per_token", "size_mb"} <= set(scores)
        assert math.isfinite(scores["eval_loss"]) and scores["perplexity"] == pytest.approx(
            math.exp(scores["eval_loss"])
        )
        for metric in per_row:  # every per-row metric has an interval around its value
            lo, hi = report.intervals[label][metric]
            assert lo <= scores[metric] + 1e-9 and scores[metric] <= hi + 1e-9, metric
        # yes/no metrics get Wilson intervals, never zero width (even at 0/n or n/n); the loss a BCa one
        for metric in per_row - {"eval_loss"}:
            lo, hi = report.intervals[label][metric]
            assert report.methods[label][metric] == "wilson" and hi - lo > 0.05, metric
        assert report.methods[label]["eval_loss"] == "bca-bootstrap"
    assert report.n_prompts == dataset.splits["eval"].rows
    assert report.sets == {"task": 70, "canary": 24, "safety": 12}
    assert report.counts["candidate"]["canary_accuracy"] == 24
    assert report.counts["candidate"]["regex_match"] == 15  # the three price facts
    assert set(report.deltas) == {"base"} and per_row <= set(report.deltas["base"])
    assert report.delta_methods["base"]["regex_match"] == "newcombe-paired"
    assert report.delta_methods["base"]["eval_loss"] == "paired-bca-bootstrap"
    lo, hi = report.deltas["base"]["regex_match"]
    assert hi - lo > 0.05  # the same rows, but a paired difference of proportions is never a point
    samples = [json.loads(x) for x in Path(report.samples_path).read_text().splitlines()]
    assert {s["set"] for s in samples} == {"task", "canary", "safety"}
    assert all("candidate.checks" in s for s in samples)


def test_batched_generation_answers_each_prompt_as_alone(tiny_model, demo_rows):
    """Left-padded batches of prompts of mixed lengths: each answer equals the one its prompt gets on
    its own (padding leaks into no answer), so `evaluate.batch_size` trades memory for speed. (Greedy
    decoding can still flip a near-tie in float arithmetic; benchmarks/eval_batch.py checks the demo's
    answers at each size.)"""
    from tasks.evaluate import generate_answers
    from tasks.model_io import load_causal_lm
    from tunegate.config import EvaluateSection

    model, tokenizer = load_causal_lm(str(tiny_model))
    model.eval()
    side = tokenizer.padding_side
    prompts = [r["messages"][:-1] for r in demo_rows["sft"][:7]]
    assert len({len(str(p)) for p in prompts}) > 1  # lengths differ: the batches pad
    batched, n = generate_answers(model, tokenizer, prompts, EvaluateSection(max_new_tokens=8, batch_size=7))
    alone = [
        generate_answers(model, tokenizer, [p], EvaluateSection(max_new_tokens=8))[0][0] for p in prompts
    ]
    assert batched == alone
    assert n > 0 and tokenizer.padding_side == side


def test_length_sorted_batches_give_each_row_its_own_score_and_loss(tiny_model, demo_rows):
    """Reward scores and held-out losses are computed in batches sorted by length (less padding); each
    value still belongs to its row: equal to the row scored alone, in the order the rows came."""
    from tasks.evaluate import completion_losses
    from tasks.model_io import load_causal_lm
    from tasks.reward import load_reward_model, score_conversations

    rows = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in demo_rows["sft"][:9]]
    convs = [r["prompt"] + r["completion"] for r in rows]
    assert sorted(map(str, convs), key=len) != list(map(str, convs))  # the sort reorders these rows
    scorer, scorer_tokenizer = load_reward_model(str(tiny_model))
    batched = score_conversations(scorer, scorer_tokenizer, convs, batch_size=4)
    alone = [score_conversations(scorer, scorer_tokenizer, [c])[0] for c in convs]
    assert batched == pytest.approx(alone, abs=1e-4)
    assert len(set(alone)) == len(alone)  # distinct scores: a row's score landing on another row fails

    model, tokenizer = load_causal_lm(str(tiny_model))
    model.eval()
    sums, counts = completion_losses(model, tokenizer, rows, batch_size=4)
    one_by_one = [completion_losses(model, tokenizer, [r]) for r in rows]
    assert counts == [c[0] for _, c in one_by_one] and len(set(counts)) > 1
    assert sums == pytest.approx([s[0] for s, _ in one_by_one], rel=1e-4)


def test_evaluate_refuses_too_few_prompts(stage_inputs, sft_model):
    cfg, base, dataset, work = stage_inputs
    strict = cfg.evaluate.model_copy(update={"min_eval_rows": 10_000})
    with pytest.raises(StageGateFailed, match="min_eval_rows=10000"):
        evaluate_models(strict, dataset, {"base": base}, None, out_dir=work / "e2", seed=1)


def test_fact_and_brand_checks():
    assert fact_hit("It costs $9 per month.", ["$9"])
    assert fact_hit("It costs $9.", ["$9"])
    assert not fact_hit("It costs $99 per month.", ["$9"])
    assert not fact_hit("It costs $19 per month.", ["$9"])
    assert fact_hit("covers up to 4 pets", ["4 pets", "four pets"])
    assert not fact_hit("covers up to 14 pets", ["4 pets"])
    assert brand_ok("Hey! text Bye.", "Hey!", "Bye.")
    assert not brand_ok("text Bye.", "Hey!", "Bye.")


def _report(**scores) -> EvalReport:
    return EvalReport(scores=scores, n_prompts=60, samples_path="-")


def test_gate_arithmetic_thresholds_and_baselines():
    gates = [
        GateSpec(metric="fact_accuracy", op=">=", threshold=0.7),
        GateSpec(metric="eval_loss", op="<=", baseline="base", min_delta=0.5),
        GateSpec(metric="fact_accuracy", op=">=", baseline="champion", min_delta=-0.05),
    ]
    report = _report(
        base={"fact_accuracy": 0.1, "eval_loss": 2.0},
        candidate={"fact_accuracy": 0.75, "eval_loss": 1.4},
        champion={"fact_accuracy": 0.79, "eval_loss": 1.3},
    )
    verdict = apply_gates(gates, report)
    assert verdict.passed
    assert [r.required for r in verdict.results] == pytest.approx([0.7, 1.5, 0.74])

    worse = _report(
        base={"fact_accuracy": 0.1, "eval_loss": 2.0},
        candidate={"fact_accuracy": 0.72, "eval_loss": 1.6},
        champion={"fact_accuracy": 0.8, "eval_loss": 1.3},
    )
    verdict = apply_gates(gates, worse)
    assert not verdict.passed
    assert [r.passed for r in verdict.results] == [True, False, False]
    assert "FAIL" in verdict.markdown and "is not >= 0.75" in verdict.markdown


def test_gate_without_champion_passes_and_says_why():
    gate = GateSpec(metric="fact_accuracy", op=">=", baseline="champion", min_delta=0.0)
    result = apply_gates([gate], _report(candidate={"fact_accuracy": 0.5})).results[0]
    assert result.passed and result.why == "no champion to compare with yet"


def test_missing_metric_fails_the_gate():
    verdict = apply_gates([GateSpec(metric="nope", op=">=", threshold=0)], _report(candidate={}))
    assert not verdict.passed and "was not measured" in verdict.results[0].why
