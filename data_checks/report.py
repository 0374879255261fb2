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
    rows_valid: int
    checks: list[CheckResult] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
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

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    def to_markdown(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        lines = [
            f"### {self.kind}: {verdict}",
            f"`{self.source}` — {self.rows_read} rows read, {self.rows_valid} valid",
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
        if self.dropped:
            lines += ["", "Dropped: " + ", ".join(f"{k}: {v}" for k, v in self.dropped.items())]
        for name, text in self.examples.items():
            lines += ["", f"{name} (tokens that train are inside ⟦ ⟧):", "", "```", text, "```"]
        return "\n".join(lines)

    def to_text(self) -> str:
        out = [
            f"{self.kind} ({self.source}): {'PASSED' if self.passed else 'FAILED'} — "
            f"{self.rows_read} rows read, {self.rows_valid} valid"
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
