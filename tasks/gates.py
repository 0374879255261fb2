"""Stage 7: decide. Each gate compares a metric to a threshold or to a baseline model's value.

Gates sit after a stage (`data`, `reward`, `sft`) or on the final evaluation. A final gate may decide
on the pessimistic end of the metric's confidence interval (`confidence_bound`): the lower bound for
`>=`, the upper bound for `<=`; against a baseline, the bound of the paired difference, added to the
baseline's value so the table stays in the metric's units. Every final gate row states its n and the
interval's method (Wilson, Newcombe paired, BCa bootstrap: `tasks/intervals.py`), and a gate whose rows
are too few to support its decision gets a power warning (`power_warning`), never a failure. A rejected
candidate is a normal outcome (the verdict says why), not an error.
"""

from __future__ import annotations

import math
from pathlib import Path

from tasks.intervals import WILSON, WILSON_TIES, scaled_rows_needed, wilson_rows_needed
from tunegate.artifacts import EvalReport, GateResult, GateVerdict, InstructionDataset, ValidatedData
from tunegate.config import GateSpec


def apply_gates(gates: list[GateSpec], report: EvalReport, candidate: str = "candidate") -> GateVerdict:
    """Evaluate every final-stage gate on the candidate's evaluation; pass only if all pass.

    Gates whose n cannot support their decision add a line to `warnings` (see `power_warning`).
    """
    results, warnings = [], []
    for gate in gates:
        if gate.stage != "final":
            continue
        result = _one(gate, report, candidate)
        rows, warning = power_warning(gate, result, report.confidence)
        results.append(result.model_copy(update={"rows_needed": rows}))
        warnings += [warning] if warning else []
    passed = all(r.passed for r in results)
    markdown = gate_table(results, passed, report, warnings=warnings)
    return GateVerdict(passed=passed, results=results, markdown=markdown, warnings=warnings)


def apply_stage_gates(gates: list[GateSpec], stage: str, metrics: dict[str, float]) -> GateVerdict:
    """Evaluate the gates that sit after `stage` on that stage's metrics (thresholds only)."""
    report = EvalReport(scores={"candidate": metrics}, n_prompts=0, samples_path="-")
    results = [_one(g, report, "candidate") for g in gates if g.stage == stage]
    passed = all(r.passed for r in results)
    return GateVerdict(
        stage=stage, passed=passed, results=results, markdown=gate_table(results, passed, None, stage)
    )


def power_warning(gate: GateSpec, result: GateResult, confidence: float) -> tuple[int | None, str | None]:
    """Whether the gate's n can support its decision, and if not, about how many rows would.

    The rule: a gate is underpowered when its interval (the one `confidence_bound` would decide on)
    contains the required value, so at this confidence the rows cannot tell on which side of the
    requirement the true value lies, whichever way the point value fell. The rows it would need are
    the fewest at which the same observed value would give an interval that excludes the requirement,
    at an effect of max(|value - required|, `gate.min_effect`) (the floor keeps a value sitting on the
    requirement from needing infinitely many):
    - a threshold gate on a Wilson interval (proportions): solved exactly, bisecting n until the Wilson
      bound at the observed rate (or at required +/- min_effect when closer than that) clears the
      threshold (`wilson_rows_needed`);
    - any other interval (BCa bootstrap, Newcombe paired difference): n (half-width / effect)^2, the
      half-width on the side that faces the requirement shrinking as 1/sqrt(n) (`scaled_rows_needed`).
    No warning when the interval excludes the requirement, or when the rows needed are not more than n
    (the value is within `min_effect` of the requirement and n resolves `min_effect`).

    Returns:
        (rows needed or None, the warning line or None). Rows None with a warning: no number of rows
        resolves it (a proportion required to be 1 or 0 itself, or beyond ten million rows).
    """
    value, required, interval, n = result.value, result.required, result.interval, result.n
    if value is None or required is None or interval is None or not n or any(map(math.isnan, interval)):
        return None, None
    if not interval[0] <= required <= interval[1]:
        return None, None
    distance = abs(value - required)
    effect = max(distance, gate.min_effect)
    # which side of the requirement to resolve: the value's, or the passing side when it sits on it
    above = value > required if value != required else gate.op == ">="
    exact = result.reference == "threshold" and result.method in (WILSON, WILSON_TIES)
    if exact:
        rate = value if distance >= gate.min_effect else required + (effect if above else -effect)
        rows = wilson_rows_needed(rate, required, confidence) if 0 <= rate <= 1 else None
    else:
        half = value - interval[0] if above else interval[1] - value
        rows = scaled_rows_needed(n, half, effect)
        if rows is None:  # a zero-width interval on the requirement: nothing to scale
            return None, None
    if rows is not None and rows <= n:
        return None, None
    if rows is None:
        need = "no number of rows would"
    else:
        at = "the observed value" if distance >= gate.min_effect else f"a difference of {gate.min_effect:g}"
        need = f"{'' if exact else 'about '}{rows} rows would, at {at}"
    warning = (
        f"`{result.gate}` {'passed' if result.passed else 'failed'} on {n} rows that cannot tell "
        f"{value:.4g} from the required {required:.4g} at {confidence:.0%} ({result.method or 'interval'} "
        f"[{interval[0]:.4g}, {interval[1]:.4g}]); {need} (`min_effect` {gate.min_effect:g})."
    )
    return rows, warning


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
    value = report.scores.get(candidate, {}).get(gate.metric)
    common = {
        "gate": gate.name,
        "stage": gate.stage,
        "metric": gate.metric,
        "op": gate.op,
        "value": value,
        "n": report.counts.get(candidate, {}).get(gate.metric),
    }
    # what the gate compares with, and the interval it may decide on: the value's own against a
    # threshold; against a baseline, the baseline's value plus the paired difference's interval
    ref = {
        "reference": "threshold",
        "reference_value": None,
        "required": gate.threshold,
        "interval": report.intervals.get(candidate, {}).get(gate.metric),
        "method": report.methods.get(candidate, {}).get(gate.metric),
    }

    def result(passed: bool, why: str, **kw) -> GateResult:
        return GateResult(**common, **{**ref, **kw}, passed=passed, why=why)

    if value is None or math.isnan(value):
        return result(False, f"metric {gate.metric!r} was not measured for the candidate", required=None)
    if gate.baseline is not None:
        ref_value = report.scores.get(gate.baseline, {}).get(gate.metric)
        if ref_value is None:
            if gate.baseline == "champion":
                return result(True, "no champion to compare with yet", reference="champion", required=None)
            return result(
                False, f"{gate.baseline} has no {gate.metric!r}", reference=gate.baseline, required=None
            )
        diff = report.deltas.get(gate.baseline, {}).get(gate.metric)
        ref = {
            "reference": gate.baseline,
            "reference_value": ref_value,
            # `>=`: at least baseline + delta; `<=`: at most baseline - delta (better means lower).
            "required": ref_value + gate.min_delta if gate.op == ">=" else ref_value - gate.min_delta,
            "interval": None if diff is None else [ref_value + diff[0], ref_value + diff[1]],
            "method": report.delta_methods.get(gate.baseline, {}).get(gate.metric),
        }
    interval, required = ref["interval"], ref["required"]
    decided_on = value
    if gate.confidence_bound:
        bound = None if interval is None else (interval[0] if gate.op == ">=" else interval[1])
        if bound is None or math.isnan(bound):
            return result(
                False,
                f"no confidence interval for {gate.metric!r} (measured once per model, not per row); "
                "drop `confidence_bound` for this gate",
            )
        decided_on = bound
    passed = decided_on >= required if gate.op == ">=" else decided_on <= required
    what = (
        f"{'lower' if gate.op == '>=' else 'upper'} {report.confidence:.0%} bound "
        if gate.confidence_bound
        else ""
    )
    why = f"{what}{decided_on:.4g} {gate.op if passed else 'is not ' + gate.op} {required:.4g}"
    return result(passed, why, decided_on=decided_on)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _with_interval(value: float | None, interval: list[float] | None) -> str:
    if interval is None or value is None:
        return _fmt(value)
    return f"{value:.4g} [{interval[0]:.4g}, {interval[1]:.4g}]"


def gate_table(
    results: list[GateResult],
    passed: bool,
    report: EvalReport | None,
    stage: str = "final",
    *,
    warnings: list[str] | None = None,
) -> str:
    """The verdict as markdown: the gates (each with its n and interval method), the power warnings,
    then (final) every model's scores side by side and the candidate's paired differences."""
    title = "Gate verdict" if stage == "final" else f"Gate verdict after {stage}"
    lines = [f"## {title}: {'PASS' if passed else 'FAIL'}", ""]
    if not results:
        lines.append("No gates at this stage.")
    else:
        lines += [
            "| gate | value [interval] | n | method | baseline | required | decided on | result | why |",
            "|---|---:|---:|---|---:|---:|---:|:---:|---|",
        ]
        for r in results:
            base = "-" if r.reference_value is None else f"{r.reference}: {r.reference_value:.4g}"
            lines.append(
                f"| `{r.gate}` | {_with_interval(r.value, r.interval)} | {r.n if r.n is not None else '-'} | "
                f"{r.method or '-'} | {base} | {_fmt(r.required)} | {_fmt(r.decided_on)} | "
                f"{'pass' if r.passed else 'FAIL'} | {r.why} |"
            )
    if warnings:
        lines += ["", "### Warnings: too few rows to support the decision", ""]
        lines += [f"- {w}" for w in warnings]
    if report is None or not report.scores:
        return "\n".join(lines)
    labels = list(report.scores)
    metrics = sorted({m for s in report.scores.values() for m in s})
    sets = ", ".join(f"{n} {name}" for name, n in report.sets.items() if n) or str(report.n_prompts)
    lines += [
        "",
        f"Scores on {report.n_prompts} held-out rows ({sets}); {report.confidence:.0%} intervals.",
        "",
        "| metric | " + " | ".join(labels) + " | interval method |",
        "|---|" + "---:|" * len(labels) + "---|",
    ]
    for m in metrics:
        cells = [
            _with_interval(report.scores[lab][m], report.intervals.get(lab, {}).get(m))
            if m in report.scores[lab]
            else "-"
            for lab in labels
        ]
        how = sorted({report.methods[lab][m] for lab in labels if m in report.methods.get(lab, {})})
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {', '.join(how) or '-'} |")
    lines += attribution(report)
    for other, diffs in report.deltas.items():
        if not diffs:
            continue
        lines += [
            "",
            f"Candidate minus {other}, paired on the same rows ({report.confidence:.0%} intervals):",
            "",
            "| metric | difference [interval] | interval method |",
            "|---|---:|---|",
        ]
        cand, base = report.scores.get("candidate", {}), report.scores.get(other, {})
        for m, (low, high) in sorted(diffs.items()):
            point = cand.get(m, math.nan) - base.get(m, math.nan)
            method = report.delta_methods.get(other, {}).get(m, "-")
            lines.append(f"| {m} | {_with_interval(point, [low, high])} | {method} |")
    return "\n".join(lines)


# Per-row metrics where a smaller value is better; every other per-row metric is better larger.
LOWER_IS_BETTER = frozenset({"eval_loss", "perplexity"})


STAGE_NAMES = {"sft": "SFT − base", "alignment": "aligned − SFT"}


def attribution(report: EvalReport) -> list[str]:
    """Markdown lines: what SFT added over the base model and alignment over SFT, each a paired
    difference with its interval, and a plain sentence on whether alignment earned its place."""
    if not report.gains:
        return []
    stages = list(report.gains)
    lines = [
        "",
        f"What each stage added, paired on the same rows ({report.confidence:.0%} intervals):",
        "",
        "| metric | " + " | ".join(STAGE_NAMES.get(s, s) for s in stages) + " |",
        "|---|" + "---:|" * len(stages),
    ]
    for m in sorted({m for g in report.gains.values() for m in g}):
        cells = [_with_interval(g[m][0], g[m][1:]) if m in g else "-" for g in report.gains.values()]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if "alignment" in report.gains:
        better, worse = _significant(report.gains["alignment"])
        if better:
            lines += ["", f"Alignment improved on the SFT model: {', '.join(better)}."]
        else:
            lines += [
                "",
                "**Alignment added nothing measurable over the SFT model**: no metric's paired interval lies "
                "on the better side of zero. The gates decide what ships; a `baseline: sft` gate refuses "
                "an aligned model that adds nothing (to ship the SFT model, run with `align.method: none`).",
            ]
        if worse:
            lines.append(f"Alignment made these worse than the SFT model: {', '.join(worse)}.")
    return lines


def _signed(point: float, low: float, high: float) -> str:
    """A difference and its interval, signed: `+0.043 [-0.015, +0.103]`."""
    return f"{point:+.3g} [{low:+.3g}, {high:+.3g}]"


def _significant(gains: dict[str, list[float]]) -> tuple[list[str], list[str]]:
    """Metrics whose paired interval lies wholly on the better (or the worse) side of zero."""
    better, worse = [], []
    for m, (point, low, high) in sorted(gains.items()):
        sign = -1 if m in LOWER_IS_BETTER else 1
        text = f"{m} {_signed(point, low, high)}"
        if (low > 0 and sign > 0) or (high < 0 and sign < 0):
            better.append(text)
        elif (high < 0 and sign > 0) or (low > 0 and sign < 0):
            worse.append(text)
    return better, worse


MODEL_ORDER = ("base", "sft", "candidate", "champion")


def chart_panels(verdict: GateVerdict, report: EvalReport | None = None) -> list[dict]:
    """What `verdict_chart` draws, one entry per gate: its title, and for a final gate on a metric the
    evaluation scored, every model's value and interval on that metric (base, SFT, candidate,
    champion, side by side) and what each stage added to it (paired difference and interval)."""
    panels = []
    for r in verdict.results or []:
        title = f"{r.gate}: {'pass' if r.passed else 'FAIL'}"
        models: list[tuple[str, float, list[float] | None]] = []
        gains: list[str] = []
        if report is not None and r.stage == "final":
            for label in (*MODEL_ORDER, *sorted(set(report.scores) - set(MODEL_ORDER))):
                value = report.scores.get(label, {}).get(r.metric)
                if value is not None:
                    models.append((label, value, report.intervals.get(label, {}).get(r.metric)))
            for stage, by_metric in report.gains.items():
                if r.metric in by_metric:
                    gains.append(f"{STAGE_NAMES.get(stage, stage)} {_signed(*by_metric[r.metric])}")
        if gains:
            title += "   (" + "; ".join(gains) + ")"
        panels.append({"result": r, "title": title, "models": models})
    return panels


def verdict_chart(verdict: GateVerdict, path: Path, report: EvalReport | None = None) -> Path:
    """A PNG with one panel per gate: the value and its interval, the baseline, the required line;
    with the evaluation `report`, also every model's value on the gate's metric and what each stage
    added to it (`chart_panels`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = chart_panels(verdict, report)
    heights = [0.55 + 0.22 * (1 + len(p["models"])) for p in panels] or [1.0]
    fig, axes = plt.subplots(
        len(heights),
        1,
        figsize=(9, sum(heights) + 0.8),
        squeeze=False,
        gridspec_kw={"height_ratios": heights},
    )
    for ax, panel in zip(axes[:, 0], panels, strict=False):
        r = panel["result"]
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
        labels = ["gate"]
        for row, (label, value, interval) in enumerate(panel["models"], start=1):
            if interval is not None:
                ax.plot(interval, [-row, -row], color="tab:blue", linewidth=2, alpha=0.35)
                points += list(interval)
            ax.plot([value], [-row], "|", color="tab:blue", markersize=9, markeredgewidth=2)
            points.append(value)
            labels.append(label)
        points = [x for x in points if math.isfinite(x)]
        if points:
            lo, hi = min(points), max(points)
            pad = (hi - lo) * 0.15 or abs(hi) * 0.1 or 0.1
            ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(-len(labels) + 0.5, 0.5)
        ax.set_yticks([-i for i in range(len(labels))], labels if len(labels) > 1 else [""], fontsize=7)
        ax.set_title(panel["title"], fontsize=8, loc="left", color=color)
        ax.tick_params(axis="x", labelsize=8)
    if not panels:
        axes[0, 0].text(0.5, 0.5, "no gates", ha="center", va="center")
        axes[0, 0].set_axis_off()
    title = "Gate verdict" if verdict.stage == "final" else f"Gate verdict after {verdict.stage}"
    fig.suptitle(
        f"{title}: {'PASS' if verdict.passed else 'FAIL'}  (dot: value, bar: interval, "
        "x: bound decided on, square: baseline, dashed: required; blue: each model's score)",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # room for the title above
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
