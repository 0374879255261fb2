"""A validation report a person can act on: each check, its verdict, counts, sample locations, the fix."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Literal

Severity = Literal["error", "warning"]


@dataclass
class Sample:
    where: str  # file:line
    value: str


@dataclass
class Finding:
    check: str
    severity: Severity
    count: int
    message: str
    fix: str
    samples: list[Sample] = field(default_factory=list)


@dataclass
class SourceInfo:
    """One source as read: its format, the shape detected for its rows and how their columns map to
    TRL's, the columns no shape reads, and for a Hub dataset the commit it resolved to."""

    file: str
    format: str
    rows: int = 0
    shapes: dict[str, int] = field(default_factory=dict)  # detected shape -> rows
    mapping: dict[str, str] = field(default_factory=dict)  # shape -> "column → field; ..."
    ignored: dict[str, int] = field(default_factory=dict)  # column -> rows that have it
    revision: str | None = None
    sha256: str | None = None  # for Hub datasets (local files are digested by the validate stage)

    def summary(self) -> str:
        parts = [f"{self.format}, {self.rows} rows"]
        if self.revision:
            parts.append(f"revision {self.revision}")
        for shape, n in self.shapes.items():
            share = f" ×{n}" if len(self.shapes) > 1 else ""
            parts.append(f"shape {shape}{share} ({self.mapping.get(shape, '')})")
        if self.ignored:
            parts.append("ignored columns: " + ", ".join(f"{c} ×{n}" for c, n in self.ignored.items()))
        return "; ".join(parts)


@dataclass
class CheckResult:
    check: str
    passed: bool
    finding: Finding | None = None


@dataclass
class DataReport:
    kind: str
    source: str
    files: list[str]
    rows_read: int
    rows_valid: int  # rows that pass every row check and are kept (not dropped by a policy)
    checks: list[CheckResult] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)  # rule -> rows it dropped (not kept)
    sources: list[SourceInfo] = field(default_factory=list)
    examples: dict[str, str] = field(default_factory=dict)  # e.g. a rendered row, trained tokens in ⟦⟧

    @property
    def errors(self) -> list[Finding]:
        return [c.finding for c in self.checks if c.finding and c.finding.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [c.finding for c in self.checks if c.finding and c.finding.severity == "warning"]

    @property
    def passed(self) -> bool:
        return not self.errors

    def add(self, check: str, finding: Finding | None = None) -> None:
        self.checks.append(CheckResult(check, finding is None or finding.severity != "error", finding))

    def counts(self) -> str:
        """e.g. '60 rows read, 31 kept (29 dropped: too_long ×29)'."""
        text = f"{self.rows_read} rows read, {self.rows_valid} kept"
        if self.dropped:
            total = sum(self.dropped.values())
            text += f" ({total} dropped: " + ", ".join(f"{k} ×{v}" for k, v in self.dropped.items()) + ")"
        return text

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    def to_markdown(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        lines = [
            f"### {self.kind}: {verdict}",
            f"`{self.source}` — {self.counts()}",
            "",
            *(f"- `{s.file}`: {_cell(s.summary())}" for s in self.sources),
            "",
            "| check | verdict | rows | detail |",
            "|---|---|---:|---|",
        ]
        for c in self.checks:
            f = c.finding
            if f is None:
                lines.append(f"| {c.check} | pass | 0 | |")
                continue
            mark = "FAIL" if f.severity == "error" else "warn"
            where = "; ".join(f"`{s.where}` {s.value}" for s in f.samples)
            detail = f"{f.message}. Fix: {f.fix}" + (f" — e.g. {where}" if where else "")
            lines.append(f"| {c.check} | {mark} | {f.count} | {_cell(detail)} |")
        for name, text in self.examples.items():
            lines += ["", f"{name} (tokens that train are inside ⟦ ⟧):", "", "```", text, "```"]
        return "\n".join(lines)

    def to_text(self) -> str:
        out = [
            f"{self.kind} ({self.source}): {'PASSED' if self.passed else 'FAILED'} — {self.counts()}",
            *(f"  source {s.file}: {s.summary()}" for s in self.sources),
        ]
        for c in self.checks:
            f = c.finding
            if f is None:
                out.append(f"  ok    {c.check}")
                continue
            mark = "FAIL " if f.severity == "error" else "warn "
            out.append(f"  {mark} {c.check}: {f.count} row(s) — {f.message}")
            for s in f.samples:
                out.append(f"          at {s.where}: {s.value}")
            out.append(f"          fix: {f.fix}")
        for name, text in self.examples.items():
            out.append(f"  {name} (tokens that train are inside ⟦ ⟧):")
            out.extend(f"    {line}" for line in text.splitlines())
        return "\n".join(out)


def reports_markdown(reports: list[DataReport]) -> str:
    return "## Data validation\n\n" + "\n\n".join(r.to_markdown() for r in reports)


def reports_json(reports: list[DataReport]) -> str:
    return json.dumps([r.to_dict() for r in reports], indent=2, ensure_ascii=False)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
