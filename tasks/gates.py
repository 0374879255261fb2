"""Stage 7: decide. Each gate compares the candidate's metric to a threshold or to a baseline model.

A rejected candidate is a normal outcome (the verdict says why), not an error.
"""

from __future__ import annotations

import math

from tunegate.artifacts import EvalReport, GateResult, GateVerdict
from tunegate.config import GateSpec


def apply_gates(gates: list[GateSpec], report: EvalReport, candidate: str = "candidate") -> GateVerdict:
    """Evaluate every gate on the candidate's scores; pass only if all pass."""
    results = [_one(g, report.scores, candidate) for g in gates]
    passed = all(r.passed for r in results)
    return GateVerdict(passed=passed, results=results, markdown=gate_table(results, report, passed))


def _one(gate: GateSpec, scores: dict[str, dict[str, float]], candidate: str) -> GateResult:
    value = scores.get(candidate, {}).get(gate.metric)
    common = {"gate": gate.name, "metric": gate.metric, "op": gate.op, "value": value}
    if value is None or math.isnan(value):
        return GateResult(
            **common,
            reference="-",
            reference_value=None,
            required=None,
            passed=False,
            why=f"metric {gate.metric!r} was not measured for the candidate",
        )
    if gate.baseline is None:
        required, reference, ref_value = gate.threshold, "threshold", None
    else:
        ref_value = scores.get(gate.baseline, {}).get(gate.metric)
        reference = gate.baseline
        if ref_value is None:
            why = (
                f"no {gate.baseline} to compare with yet"
                if gate.baseline == "champion"
                else f"{gate.baseline} has no {gate.metric!r}"
            )
            return GateResult(
                **common,
                reference=reference,
                reference_value=None,
                required=None,
                passed=gate.baseline == "champion",
                why=why,
            )
        # `>=`: at least baseline + delta; `<=`: at most baseline - delta (better means lower).
        required = ref_value + gate.min_delta if gate.op == ">=" else ref_value - gate.min_delta
    passed = value >= required if gate.op == ">=" else value <= required
    why = (
        f"{value:.4g} {gate.op} {required:.4g}" if passed else f"{value:.4g} is not {gate.op} {required:.4g}"
    )
    return GateResult(
        **common, reference=reference, reference_value=ref_value, required=required, passed=passed, why=why
    )


def gate_table(results: list[GateResult], report: EvalReport, passed: bool) -> str:
    """The verdict as markdown: the gates, then every model's scores side by side."""
    lines = [
        f"## Gate verdict: {'PASS' if passed else 'FAIL'}",
        "",
        "| gate | candidate | reference | required | result | why |",
        "|---|---:|---:|---:|:---:|---|",
    ]
    for r in results:
        ref = "-" if r.reference_value is None else f"{r.reference}: {r.reference_value:.4g}"
        req = "-" if r.required is None else f"{r.required:.4g}"
        val = "-" if r.value is None else f"{r.value:.4g}"
        lines.append(f"| `{r.gate}` | {val} | {ref} | {req} | {'pass' if r.passed else 'FAIL'} | {r.why} |")
    labels = list(report.scores)
    metrics = sorted({m for s in report.scores.values() for m in s})
    lines += [
        "",
        f"Scores on {report.n_prompts} held-out prompts:",
        "",
        "| metric | " + " | ".join(labels) + " |",
        "|---|" + "---:|" * len(labels),
    ]
    for m in metrics:
        cells = [f"{report.scores[lab][m]:.4g}" if m in report.scores[lab] else "-" for lab in labels]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
