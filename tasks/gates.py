"""Stage 7: decide. Each gate compares a metric to a threshold or to a baseline model's value.

Gates sit after a stage (`data`, `reward`, `sft`) or on the final evaluation. A final gate may decide
on the pessimistic end of the metric's bootstrap interval (`confidence_bound`): the lower bound for
`>=`, the upper bound for `<=`; against a baseline, the bound of the paired difference, added to the
baseline's value so the table stays in the metric's units. A rejected candidate is a normal outcome
(the verdict says why), not an error.
"""

from __future__ import annotations

import math
from pathlib import Path

from tunegate.artifacts import EvalReport, GateResult, GateVerdict, InstructionDataset, ValidatedData
from tunegate.config import GateSpec


def apply_gates(gates: list[GateSpec], report: EvalReport, candidate: str = "candidate") -> GateVerdict:
    """Evaluate every final-stage gate on the candidate's evaluation; pass only if all pass."""
    results = [_one(g, report, candidate) for g in gates if g.stage == "final"]
    passed = all(r.passed for r in results)
    return GateVerdict(passed=passed, results=results, markdown=gate_table(results, passed, report))


def apply_stage_gates(gates: list[GateSpec], stage: str, metrics: dict[str, float]) -> GateVerdict:
    """Evaluate the gates that sit after `stage` on that stage's metrics (thresholds only)."""
    report = EvalReport(scores={"candidate": metrics}, n_prompts=0, samples_path="-")
    results = [_one(g, report, "candidate") for g in gates if g.stage == stage]
    passed = all(r.passed for r in results)
    return GateVerdict(
        stage=stage, passed=passed, results=results, markdown=gate_table(results, passed, None, stage)
    )


def data_metrics(validated: ValidatedData, dataset: InstructionDataset | None = None) -> dict[str, float]:
    """What a `data` gate can name: per kind `read`, `valid`, `kept`, `dropped_fraction`; per built
    split `<split>.rows`; and `warnings`."""
    out: dict[str, float] = {"warnings": float(validated.warnings)}
    for kind, counts in validated.counts.items():
        out.update({f"{kind}.{k}": float(v) for k, v in counts.items()})
        if counts.get("read"):
            out[f"{kind}.dropped_fraction"] = 1 - counts.get("kept", 0) / counts["read"]
    if dataset is not None:
        out.update({f"{name}.rows": float(f.rows) for name, f in dataset.splits.items()})
    return out


def _one(gate: GateSpec, report: EvalReport, candidate: str) -> GateResult:
    scores = report.scores
    value = scores.get(candidate, {}).get(gate.metric)
    interval = report.intervals.get(candidate, {}).get(gate.metric)
    common = {
        "gate": gate.name,
        "stage": gate.stage,
        "metric": gate.metric,
        "op": gate.op,
        "value": value,
        "interval": interval,
        "n": report.counts.get(candidate, {}).get(gate.metric),
    }

    def result(passed: bool, why: str, **kw) -> GateResult:
        fields = {"reference": "-", "reference_value": None, "required": None, **kw}
        return GateResult(**common, passed=passed, why=why, **fields)

    if value is None or math.isnan(value):
        return result(False, f"metric {gate.metric!r} was not measured for the candidate")
    if gate.baseline is None:
        required, reference, ref_value = gate.threshold, "threshold", None
        bound = None if interval is None else (interval[0] if gate.op == ">=" else interval[1])
    else:
        reference = gate.baseline
        ref_value = scores.get(gate.baseline, {}).get(gate.metric)
        if ref_value is None:
            if gate.baseline == "champion":
                return result(True, "no champion to compare with yet", reference=reference)
            return result(False, f"{gate.baseline} has no {gate.metric!r}", reference=reference)
        # `>=`: at least baseline + delta; `<=`: at most baseline - delta (better means lower).
        required = ref_value + gate.min_delta if gate.op == ">=" else ref_value - gate.min_delta
        diff = report.deltas.get(gate.baseline, {}).get(gate.metric)
        bound = None if diff is None else ref_value + (diff[0] if gate.op == ">=" else diff[1])
    decided_on = value
    if gate.confidence_bound:
        if bound is None or math.isnan(bound):
            return result(
                False,
                f"no confidence interval for {gate.metric!r} (measured once per model, not per row); "
                "drop `confidence_bound` for this gate",
                reference=reference,
                reference_value=ref_value,
                required=required,
            )
        decided_on = bound
    passed = decided_on >= required if gate.op == ">=" else decided_on <= required
    what = (
        f"{'lower' if gate.op == '>=' else 'upper'} {report.confidence:.0%} bound "
        if gate.confidence_bound
        else ""
    )
    why = f"{what}{decided_on:.4g} {gate.op if passed else 'is not ' + gate.op} {required:.4g}"
    return GateResult(
        **common,
        decided_on=decided_on,
        reference=reference,
        reference_value=ref_value,
        required=required,
        passed=passed,
        why=why,
    )


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _with_interval(value: float | None, interval: list[float] | None) -> str:
    if interval is None or value is None:
        return _fmt(value)
    return f"{value:.4g} [{interval[0]:.4g}, {interval[1]:.4g}]"


def gate_table(
    results: list[GateResult], passed: bool, report: EvalReport | None, stage: str = "final"
) -> str:
    """The verdict as markdown: the gates, then (final) every model's scores side by side."""
    title = "Gate verdict" if stage == "final" else f"Gate verdict after {stage}"
    lines = [f"## {title}: {'PASS' if passed else 'FAIL'}", ""]
    if not results:
        lines.append("No gates at this stage.")
    else:
        lines += [
            "| gate | value [interval] | n | baseline | required | decided on | result | why |",
            "|---|---:|---:|---:|---:|---:|:---:|---|",
        ]
        for r in results:
            base = "-" if r.reference_value is None else f"{r.reference}: {r.reference_value:.4g}"
            lines.append(
                f"| `{r.gate}` | {_with_interval(r.value, r.interval)} | {r.n if r.n is not None else '-'} | "
                f"{base} | {_fmt(r.required)} | {_fmt(r.decided_on)} | {'pass' if r.passed else 'FAIL'} | "
                f"{r.why} |"
            )
    if report is None or not report.scores:
        return "\n".join(lines)
    labels = list(report.scores)
    metrics = sorted({m for s in report.scores.values() for m in s})
    sets = ", ".join(f"{n} {name}" for name, n in report.sets.items() if n) or str(report.n_prompts)
    lines += [
        "",
        f"Scores on {report.n_prompts} held-out rows ({sets}); intervals: {report.confidence:.0%} bootstrap.",
        "",
        "| metric | " + " | ".join(labels) + " |",
        "|---|" + "---:|" * len(labels),
    ]
    for m in metrics:
        cells = [
            _with_interval(report.scores[lab][m], report.intervals.get(lab, {}).get(m))
            if m in report.scores[lab]
            else "-"
            for lab in labels
        ]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict_chart(verdict: GateVerdict, path: Path) -> Path:
    """A PNG with one panel per gate: the value and its interval, the baseline, the required line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = verdict.results or []
    fig, axes = plt.subplots(
        max(len(results), 1), 1, figsize=(8, 0.9 * max(len(results), 1) + 0.8), squeeze=False
    )
    for ax, r in zip(axes[:, 0], results, strict=False):
        color = "tab:green" if r.passed else "tab:red"
        points = [x for x in (r.value, r.required, r.reference_value, *(r.interval or [])) if x is not None]
        if r.value is not None:
            if r.interval is not None:
                ax.plot(r.interval, [0, 0], color=color, linewidth=3, alpha=0.4)
            ax.plot([r.value], [0], "o", color=color)
        if r.decided_on is not None and r.decided_on != r.value:  # an interval bound decided
            ax.plot([r.decided_on], [0], "x", color=color, markersize=9)
        if r.reference_value is not None:
            ax.plot([r.reference_value], [0], "s", color="tab:gray", label=r.reference)
        if r.required is not None:
            ax.axvline(r.required, color="black", linestyle="--", linewidth=1)
        if points:
            lo, hi = min(points), max(points)
            pad = (hi - lo) * 0.15 or abs(hi) * 0.1 or 0.1
            ax.set_xlim(lo - pad, hi + pad)
        ax.set_yticks([])
        ax.set_title(f"{r.gate}: {'pass' if r.passed else 'FAIL'}", fontsize=9, loc="left", color=color)
        ax.tick_params(axis="x", labelsize=8)
    if not results:
        axes[0, 0].text(0.5, 0.5, "no gates", ha="center", va="center")
        axes[0, 0].set_axis_off()
    title = "Gate verdict" if verdict.stage == "final" else f"Gate verdict after {verdict.stage}"
    fig.suptitle(
        f"{title}: {'PASS' if verdict.passed else 'FAIL'}  (dot: value, bar: interval, "
        "x: bound decided on, square: baseline, dashed: required)",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
