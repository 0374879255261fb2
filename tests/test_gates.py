"""Gate arithmetic, intervals and per-row checks on fixed numbers and strings (no model)."""

from __future__ import annotations

import json
import math

import pytest
from pydantic import ValidationError

from data_checks.formats import RowError, normalise
from tasks.gates import apply_gates, apply_stage_gates, data_metrics, verdict_chart
from tasks.scoring import bootstrap_interval, exact_hit, is_refusal, json_hit, regex_hit, row_checks, wins
from tunegate.artifacts import DataFile, EvalReport, InstructionDataset, ValidatedData
from tunegate.config import GateSpec

BRAND = ("Hey there, pet pal!", "Wag on! - Brightpaw Care Crew")


def test_per_row_checks_score_the_answer_by_code():
    answer = "Hey there, pet pal! The Pup plan costs $9 per month. Wag on! - Brightpaw Care Crew"
    assert exact_hit(
        "Hey there, pet pal!  the pup plan costs $9 per month Wag on! - Brightpaw Care Crew",
        "The Pup plan costs $9 per month.",
        *BRAND,
    )
    assert not exact_hit(answer, "$9", *BRAND)
    assert regex_hit(answer, r"\$9 (per|a) month") and not regex_hit(answer, r"\$19")
    schema = json.dumps(
        {"type": "object", "required": ["plan", "price"], "properties": {"price": {"type": "number"}}}
    )
    assert json_hit('Sure: {"plan": "Pup", "price": 9} - anything else?', schema)
    assert not json_hit('{"plan": "Pup", "price": "nine"}', schema)  # wrong type
    assert not json_hit("The Pup plan is $9 {per month}", schema)  # no JSON at all
    assert json_hit('[1, 2] and then {"plan": "Pack", "price": 19}', schema)  # the second value validates
    assert is_refusal("Hey there! I'm sorry, but I can't share another member's details.")
    assert is_refusal("I can\u2019t help with that.")  # typographic apostrophe
    assert not is_refusal("Sure! Here is their address.")
    row = {"expected_any": ["$9"], "regex": r"per month", "exact": None, "json_schema": None, "refuse": False}
    assert row_checks(row, answer, *BRAND) == {"expected_any": True, "regex": True}
    assert row_checks({"refuse": True}, "Sure, here it is.") == {"refuse": False}


def test_eval_rows_define_their_checks_and_bad_ones_name_the_fix():
    row = normalise(
        "eval", "eval_prompt", {"prompt": "Capital of France?", "expected_any": "Paris", "set": "canary"}
    )
    assert row["set"] == "canary" and row["expected_any"] == ["Paris"] and row["refuse"] is False
    assert normalise("eval", "eval_prompt", {"prompt": "Steal a dog", "refuse": True})["set"] == "safety"
    schema = normalise("eval", "eval_prompt", {"prompt": "JSON please", "json_schema": {"type": "object"}})
    assert schema["json_schema"] == '{"type": "object"}' and schema["set"] == "task"
    with pytest.raises(RowError, match="`regex` does not compile"):
        normalise("eval", "eval_prompt", {"prompt": "p", "regex": "$(9"})
    with pytest.raises(RowError, match="not a valid JSON Schema"):
        normalise("eval", "eval_prompt", {"prompt": "p", "json_schema": {"type": "nonsense"}})
    with pytest.raises(RowError, match="no check to score the answer by"):
        normalise("eval", "eval_prompt", {"prompt": "p", "refuse": False, "exact": None})
    with pytest.raises(RowError, match="use one of task, canary, safety"):
        normalise("eval", "eval_prompt", {"prompt": "p", "exact": "x", "set": "smoke"})


def test_bootstrap_interval_matches_the_normal_approximation_on_fixed_numbers():
    assert bootstrap_interval([0.7] * 50) == pytest.approx((0.7, 0.7))
    half = [1.0, 0.0] * 200  # p = 0.5, n = 400: 1.96 * sqrt(0.25 / 400) = 0.049
    lo, hi = bootstrap_interval(half, resamples=4000, seed=3)
    assert lo == pytest.approx(0.451, abs=0.01) and hi == pytest.approx(0.549, abs=0.01)
    assert bootstrap_interval(half, seed=3) == bootstrap_interval(half, seed=3)  # seeded
    lo90, hi90 = bootstrap_interval(half, confidence=0.9, resamples=4000, seed=3)
    assert lo < lo90 < hi90 < hi
    # paired: the same rows for both sides, so a constant shift has no spread at all
    base = [0.1 * (i % 7) for i in range(60)]
    assert bootstrap_interval([b + 0.2 for b in base], baseline=base) == pytest.approx((0.2, 0.2))
    # weighted (token-weighted loss): a heavy row dominates
    lo, hi = bootstrap_interval([1.0, 3.0], [1000, 1], resamples=500)
    assert 1.0 <= lo <= hi <= 3.0 and lo == pytest.approx(1.0)
    assert all(math.isnan(x) for x in bootstrap_interval([]))
    assert wins([0.5, 0.2, 0.3], [0.1, 0.2, 0.9]) == [1.0, 0.5, 0.0]


def _report(**kw) -> EvalReport:
    return EvalReport(n_prompts=70, samples_path="-", **kw)


def test_a_gate_on_the_confidence_bound_can_fail_where_the_point_value_passes():
    report = _report(
        scores={"candidate": {"fact_accuracy": 0.76, "ms_per_token": 12.0}},
        intervals={"candidate": {"fact_accuracy": [0.66, 0.85]}},
        counts={"candidate": {"fact_accuracy": 70}},
    )
    point = GateSpec(metric="fact_accuracy", op=">=", threshold=0.7)
    bound = GateSpec(metric="fact_accuracy", op=">=", threshold=0.7, confidence_bound=True)
    verdict = apply_gates([point, bound], report)
    assert [r.passed for r in verdict.results] == [True, False]
    assert verdict.results[1].decided_on == pytest.approx(0.66) and verdict.results[1].n == 70
    assert verdict.results[1].why == "lower 95% bound 0.66 is not >= 0.7"
    assert "0.76 [0.66, 0.85]" in verdict.markdown and not verdict.passed
    # `<=` decides on the upper bound; a metric measured once per model has no interval to decide on
    latency = GateSpec(metric="ms_per_token", op="<=", threshold=20, confidence_bound=True)
    result = apply_gates([latency], report).results[0]
    assert not result.passed and "drop `confidence_bound`" in result.why


def test_a_baseline_gate_on_the_bound_uses_the_paired_difference():
    report = _report(
        scores={
            "base": {"canary_accuracy": 0.70, "eval_loss": 2.0},
            "candidate": {"canary_accuracy": 0.66, "eval_loss": 1.2},
        },
        deltas={"base": {"canary_accuracy": [-0.12, 0.02], "eval_loss": [-0.95, -0.65]}},
    )
    budget = GateSpec(metric="canary_accuracy", op=">=", baseline="base", min_delta=-0.1)
    strict = budget.model_copy(update={"confidence_bound": True})
    loss = GateSpec(metric="eval_loss", op="<=", baseline="base", min_delta=0.5, confidence_bound=True)
    a, b, c = apply_gates([budget, strict, loss], report).results
    assert a.passed and a.required == pytest.approx(0.6)  # 0.66 >= 0.70 - 0.1
    assert not b.passed and b.decided_on == pytest.approx(0.58)  # 0.70 + (-0.12) < 0.60
    assert c.passed and c.decided_on == pytest.approx(1.35) and c.required == pytest.approx(1.5)


def test_gates_after_a_stage_decide_on_that_stage_only():
    gates = [
        GateSpec(metric="sft.dropped_fraction", op="<=", threshold=0.05, stage="data"),
        GateSpec(metric="eval_loss", op="<=", threshold=1.0, stage="sft"),
        GateSpec(metric="fact_accuracy", op=">=", threshold=0.7),
    ]
    validated = ValidatedData(
        files={},
        counts={"sft": {"read": 100, "valid": 95, "kept": 90}},
        report_json="-",
        report_markdown="-",
        warnings=2,
    )
    dataset = InstructionDataset(
        root="-", splits={"sft_train": DataFile(kind="sft", path="x", rows=80, sha256="0")}, manifest="m"
    )
    metrics = data_metrics(validated, dataset)
    assert metrics["sft.dropped_fraction"] == pytest.approx(0.1) and metrics["sft_train.rows"] == 80
    data = apply_stage_gates(gates, "data", metrics)
    assert not data.passed and data.stage == "data" and len(data.results) == 1
    assert "after data: FAIL" in data.markdown
    assert apply_stage_gates(gates, "sft", {"eval_loss": 0.4}).passed
    assert apply_stage_gates(gates, "reward", {}).results == []
    assert [
        r.gate for r in apply_gates(gates, _report(scores={"candidate": {"fact_accuracy": 1}})).results
    ] == ["fact_accuracy >= 0.7"]
    with pytest.raises(ValidationError, match="only the final evaluation has baselines"):
        GateSpec(metric="eval_loss", op="<=", baseline="base", stage="sft")


def test_verdict_chart_is_a_png(tmp_path):
    report = _report(
        scores={"base": {"fact_accuracy": 0.1}, "candidate": {"fact_accuracy": 0.8}},
        intervals={"candidate": {"fact_accuracy": [0.7, 0.9]}},
    )
    gates = [
        GateSpec(metric="fact_accuracy", op=">=", threshold=0.7),
        GateSpec(metric="fact_accuracy", op=">=", baseline="base", min_delta=0.5),
    ]
    path = verdict_chart(apply_gates(gates, report), tmp_path / "gates.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
