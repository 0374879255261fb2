"""Gate arithmetic, intervals and per-row checks on fixed numbers and strings (no model)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from data_checks.formats import RowError, normalise
from tasks.gates import apply_gates, apply_stage_gates, chart_panels, data_metrics, verdict_chart
from tasks.intervals import NEWCOMBE, WILSON, newcombe_paired_interval, wilson_interval
from tasks.scoring import exact_hit, is_refusal, json_hit, regex_hit, row_checks
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
    # 0.66 <= 0.7 <= 0.85: both gates warn; no method recorded, so the half-width scales as 1/sqrt(n):
    # 70 * (0.10 / 0.06)^2 = 194.4
    assert [r.rows_needed for r in verdict.results] == [195, 195] and len(verdict.warnings) == 2
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


def _proportions(**metrics: tuple[int, int]) -> dict:
    """Report fields for the candidate's yes/no metrics, metric=(successes, rows), as evaluation
    records them."""
    return {
        "scores": {"candidate": {m: k / n for m, (k, n) in metrics.items()}},
        "intervals": {"candidate": {m: list(wilson_interval(k, n)) for m, (k, n) in metrics.items()}},
        "methods": {"candidate": {m: WILSON for m in metrics}},
        "counts": {"candidate": {m: n for m, (_, n) in metrics.items()}},
    }


def test_a_12_row_safety_gate_passes_with_a_warning_naming_the_rows_it_needs():
    report = _report(**_proportions(safety_refusal_rate=(10, 12), canary_accuracy=(118, 120)))
    safety = GateSpec(metric="safety_refusal_rate", op=">=", threshold=0.8)
    canary = GateSpec(metric="canary_accuracy", op=">=", threshold=0.8)
    verdict = apply_gates([safety, canary], report)
    a, b = verdict.results
    assert verdict.passed and a.passed and a.n == 12 and a.method == WILSON
    assert a.interval == pytest.approx([0.551969, 0.953035], abs=1e-6)
    # at the observed 10/12 the Wilson lower bound first clears 0.8 at 554 rows
    assert a.rows_needed == 554
    assert verdict.warnings == [
        "`safety_refusal_rate >= 0.8` passed on 12 rows that cannot tell 0.8333 from the required 0.8 "
        "at 95% (wilson [0.552, 0.953]); 554 rows would, at the observed value (`min_effect` 0.02)."
    ]
    assert b.rows_needed is None  # 118/120: [0.941, 0.995] is clear of 0.8
    assert "| `safety_refusal_rate >= 0.8` | 0.8333 [0.552, 0.953] | 12 | wilson |" in verdict.markdown
    assert "### Warnings: too few rows to support the decision" in verdict.markdown
    assert f"- {verdict.warnings[0]}" in verdict.markdown
    # a value sitting on the threshold: the rows to resolve `min_effect` (0.82 against 0.8)
    on_it = apply_gates([safety], _report(**_proportions(safety_refusal_rate=(40, 50))))
    assert on_it.results[0].rows_needed == 1537
    assert on_it.warnings[0].endswith("1537 rows would, at a difference of 0.02 (`min_effect` 0.02).")


def test_a_bound_gate_on_15_of_15_decides_on_the_wilson_bound_not_on_1():
    report = _report(**_proportions(regex_match=(15, 15)))
    gate = GateSpec(metric="regex_match", op=">=", threshold=0.8, confidence_bound=True)
    verdict = apply_gates([gate], report)
    result = verdict.results[0]
    # 15 / (15 + 1.96^2) = 0.7961: the percentile bootstrap said [1, 1] and decided on the point value
    assert not verdict.passed and result.decided_on == pytest.approx(0.796117, abs=1e-6)
    assert result.why == "lower 95% bound 0.7961 is not >= 0.8"
    assert result.rows_needed == 16  # n / (n + z^2) > 0.8 from n > 4 z^2 = 15.4
    assert verdict.warnings[0].startswith("`regex_match >= 0.8 (CI bound)` failed on 15 rows")


def test_a_baseline_bound_gate_decides_on_the_newcombe_paired_difference():
    low, high = newcombe_paired_interval(0, 28, 0, 0)  # 28 of 28 against 0 of 28 on the same rows
    report = _report(
        scores={"base": {"fact_accuracy": 0.0}, "candidate": {"fact_accuracy": 1.0}},
        deltas={"base": {"fact_accuracy": [low, high]}},
        delta_methods={"base": {"fact_accuracy": NEWCOMBE}},
        counts={"candidate": {"fact_accuracy": 28}},
    )
    lift = GateSpec(metric="fact_accuracy", op=">=", baseline="base", min_delta=0.3, confidence_bound=True)
    too_much = lift.model_copy(update={"min_delta": 0.9})
    a, b = apply_gates([lift, too_much], report).results
    # 1 - sqrt(2) * 1.96^2 / (28 + 1.96^2) = 0.8294: not zero width, yet clear of 0.3
    assert a.passed and a.decided_on == pytest.approx(0.829385, abs=1e-6) and a.rows_needed is None
    assert a.method == NEWCOMBE and a.n == 28 and a.interval == pytest.approx([0.829385, 1.0], abs=1e-6)
    # base + 0.9 lies inside [0.83, 1]: fails on the bound, and the paired half-width below the value
    # (0.1706) must shrink to the 0.1 effect: 28 * 1.706^2 = 81.5
    assert not b.passed and b.rows_needed == 82
    verdict = apply_gates([lift], report)
    assert "| 28 | newcombe-paired | base: 0 |" in verdict.markdown and not verdict.warnings
    assert "| fact_accuracy | 1 [0.8294, 1] | newcombe-paired |" in verdict.markdown  # the paired table


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
    path = verdict_chart(apply_gates(gates, report), tmp_path / "gates.png", report)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_the_chart_shows_every_model_and_what_each_stage_added_to_the_gated_metric(tmp_path):
    report = _attribution_report([1] * 36 + [0] * 4)
    report.scores["champion"] = {"fact_accuracy": 0.6}
    verdict = apply_gates([SFT_GATE, GateSpec(metric="ms_per_token", op="<=", threshold=250)], report)
    gated, unscored = chart_panels(verdict, report)
    assert [(label, value) for label, value, _ in gated["models"]] == [
        ("base", 0.0),
        ("sft", 0.5),
        ("candidate", 0.9),
        ("champion", 0.6),
    ]
    sft_interval = gated["models"][1][2]
    assert (
        sft_interval == report.intervals["sft"]["fact_accuracy"] and sft_interval[0] < 0.5 < sft_interval[1]
    )
    sft_gain, aligned_gain = report.gains["sft"]["fact_accuracy"], report.gains["alignment"]["fact_accuracy"]
    assert f"SFT − base +0.5 [{sft_gain[1]:+.3g}, {sft_gain[2]:+.3g}]" in gated["title"]
    assert f"aligned − SFT +0.4 [{aligned_gain[1]:+.3g}, {aligned_gain[2]:+.3g}]" in gated["title"]
    assert unscored["models"] == [] and "aligned" not in unscored["title"]  # no model scored it
    assert [p["models"] for p in chart_panels(verdict)] == [[], []]  # a stage's gates: no evaluation
    path = verdict_chart(verdict, tmp_path / "gates.png", report)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _attribution_report(aligned_hits: list[int]) -> EvalReport:
    """Three models on the same 40 rows: base never right, SFT right on 20, the aligned candidate as given."""
    from tasks.evaluate import summarise_report

    n = 40
    per_row = {
        "base": {"fact_accuracy": [0.0] * n},
        "sft": {"fact_accuracy": [1.0] * 20 + [0.0] * 20},
        "candidate": {"fact_accuracy": [float(x) for x in aligned_hits]},
    }
    from tunegate.config import EvaluateSection

    none = {label: {} for label in per_row}
    return summarise_report(EvaluateSection(), per_row, none, none, 1, n_prompts=n, samples_path="-")


SFT_GATE = GateSpec(metric="fact_accuracy", op=">=", baseline="sft", min_delta=0.0, confidence_bound=True)


def test_alignment_that_adds_nothing_is_said_plainly_and_a_baseline_sft_gate_refuses_it():
    same = _attribution_report([1] * 20 + [0] * 20)  # the aligned model answers exactly as SFT does
    verdict = apply_gates([SFT_GATE], same)
    assert not verdict.passed
    (row,) = verdict.results
    assert row.reference == "sft" and row.reference_value == 0.5 and row.method == "newcombe-paired"
    assert row.decided_on < 0.5  # the pessimistic end of a non-zero-width paired interval
    assert "**Alignment added nothing measurable over the SFT model**" in verdict.markdown
    assert "| fact_accuracy | 0.5 [" in verdict.markdown  # SFT over base: +0.5 with its interval
    assert same.gains["sft"]["fact_accuracy"][0] == 0.5 and same.gains["alignment"]["fact_accuracy"][0] == 0.0


def test_alignment_that_earns_its_place_passes_a_baseline_sft_gate():
    better = _attribution_report([1] * 36 + [0] * 4)  # right on every row SFT was, and 16 more
    verdict = apply_gates([SFT_GATE], better)
    assert verdict.passed
    (row,) = verdict.results
    assert row.value == 0.9 and row.decided_on > 0.5
    assert "Alignment improved on the SFT model: fact_accuracy +0.4 [" in verdict.markdown
    low = better.gains["alignment"]["fact_accuracy"][1]
    assert row.decided_on == pytest.approx(0.5 + low)


def test_a_baseline_sft_gate_without_alignment_is_a_config_error():
    from tunegate.config import PipelineConfig

    with pytest.raises(ValidationError, match="with align.method=none the candidate is the SFT model"):
        PipelineConfig.model_validate(
            {"align": {"method": "none"}, "gates": [SFT_GATE.model_dump()], "data": {"preferences": None}}
        )
