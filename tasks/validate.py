"""Stage 1: validate every input file before any training starts."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from data_checks.checks import CheckedData, check_data, check_leakage
from data_checks.readers import resolve_paths
from data_checks.report import DataReport, reports_json, reports_markdown
from tunegate.artifacts import DataFile, ModelArtifact, ValidatedData, sha256_file
from tunegate.config import DataSection, ValidateSection
from tunegate.errors import DataValidationError

log = logging.getLogger(__name__)


def validate_data(
    cfg: ValidateSection,
    data: DataSection,
    base: ModelArtifact | None,
    *,
    out_dir: Path,
    system_prompt: str | None = None,
) -> ValidatedData:
    """Check each data kind with the real tokenizer and chat template; write the report and the
    valid rows (normalised to TRL's formats) under `out_dir`.

    Raises:
        DataValidationError: any check failed; `report` holds the reports, and the markdown report
            is written to `out_dir/validation.md` first.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(base.path) if base is not None else None
    reports: list[DataReport] = []
    files: dict[str, DataFile] = {}
    checked_by_kind = {}
    for kind in ("sft", "preferences", "prompts", "eval"):
        spec = getattr(data, kind)
        checked = check_kind(cfg, kind, spec, tokenizer, system_prompt, data.shapes.get(kind))
        checked_by_kind[kind] = checked
        reports.append(checked.report)
    check_leakage(
        checked_by_kind["eval"].report,
        checked_by_kind["eval"].rows,
        {k: c.rows for k, c in checked_by_kind.items() if k != "eval"},
        cfg.sample_rows,
    )
    for kind, checked in checked_by_kind.items():
        log.info("%s", checked.report.to_text())
        if checked.report.passed:
            path = out_dir / f"{kind}.jsonl"
            with open(path, "w", encoding="utf-8") as f:
                for row in checked.rows:
                    f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
            files[kind] = DataFile(
                kind=kind, path=str(path), rows=len(checked.rows), sha256=sha256_file(path)
            )
    md_path, json_path = out_dir / "validation.md", out_dir / "validation.json"
    md_path.write_text(reports_markdown(reports), encoding="utf-8")
    json_path.write_text(reports_json(reports), encoding="utf-8")
    failed = [r for r in reports if not r.passed]
    if failed:
        first = failed[0].errors[0]
        where = f" at {first.samples[0].where}" if first.samples else ""
        raise DataValidationError(
            f"data validation failed for {', '.join(r.kind for r in failed)}: "
            f"{first.check}{where}: {first.message}. Fix: {first.fix}. Full report: {md_path}",
            report=reports,
        )
    return ValidatedData(
        files=files,
        report_json=str(json_path),
        report_markdown=str(md_path),
        warnings=sum(len(r.warnings) for r in reports),
    )


def check_kind(
    cfg: ValidateSection,
    kind: str,
    spec: str,
    tokenizer,
    system_prompt: str | None = None,
    shape: str | None = None,
) -> CheckedData:
    """Run every single-file check for one data kind with the settings of `cfg` (also `tunegate validate`)."""
    return check_data(
        kind,
        spec,
        min_rows=cfg.min_rows.get(kind, 1),
        max_length=cfg.max_length,
        length_policy=cfg.length_policy,
        max_duplicate_fraction=cfg.max_duplicate_fraction,
        pii_policy=cfg.pii_policy,
        sample_rows=cfg.sample_rows,
        tokenizer=tokenizer,
        system_prompt=system_prompt,
        shape=shape,
    )


def source_digests(data: DataSection) -> dict[str, str]:
    """sha256 of every raw input file, for lineage and caching."""
    return {
        str(p): sha256_file(p)
        for kind in ("sft", "preferences", "prompts", "eval")
        for p in resolve_paths(getattr(data, kind))
    }


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
