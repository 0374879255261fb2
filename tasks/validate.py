"""Stage 1: validate every input file before any training starts."""

from __future__ import annotations

import logging
from pathlib import Path

from data_checks.checks import CheckedData, check_data, check_leakage, dropped_path
from data_checks.report import reports_json, reports_markdown
from tunegate.artifacts import DataFile, ModelArtifact, ValidatedData, sha256_dir, sha256_file
from tunegate.config import DataSection, DataSpec, ValidateSection
from tunegate.errors import DataValidationError

log = logging.getLogger(__name__)


def validate_data(
    cfg: ValidateSection,
    data: DataSection,
    base: ModelArtifact | None,
    *,
    out_dir: Path,
    system_prompt: str | None = None,
    train_on: str = "all_assistant",
) -> ValidatedData:
    """Check each data kind with the real tokenizer and chat template; write the report and the
    valid rows (normalised to TRL's formats) under `out_dir`. `train_on` (`sft.train_on`): the
    assistant turns whose loss mask is checked.

    Raises:
        DataValidationError: any check failed; `report` holds the reports, and the markdown report
            is written to `out_dir/validation.md` first.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = (
        load_tokenizer(base.path, trust_remote_code=base.trust_remote_code, chat_template=base.chat_template)
        if base is not None
        else None
    )
    checked: dict[str, CheckedData] = {}
    for kind in ("sft", "preferences", "prompts", "eval"):
        if getattr(data, kind) is None:  # a kind this run's stages do not read (see align.method)
            continue
        checked[kind] = check_kind(
            cfg,
            kind,
            getattr(data, kind),
            tokenizer,
            system_prompt,
            data.shapes.get(kind),
            out_path=out_dir / f"{kind}.jsonl",
            train_on=train_on,
        )
    check_leakage(
        checked["eval"].report,
        checked["eval"],
        {k: c for k, c in checked.items() if k != "eval"},
        cfg.sample_rows,
    )
    reports = [c.report for c in checked.values()]
    for report in reports:
        log.info("%s", report.to_text())
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
    files = {
        kind: DataFile(kind=kind, path=str(c.path), rows=c.report.rows_valid, sha256=sha256_file(c.path))
        for kind, c in checked.items()
    }
    return ValidatedData(
        files=files,
        dropped={kind: str(dropped_path(c.path)) for kind, c in checked.items()},
        counts={
            kind: {"read": c.report.rows_read, "valid": len(c.frame), "kept": c.report.rows_valid}
            for kind, c in checked.items()
        },
        # Local files by their sha256; a Hub dataset (its label names the resolved commit) by the sha256
        # of the Arrow files it loaded.
        sources={s.file: s.sha256 or _digest(s.file) for r in reports for s in r.sources},
        report_json=str(json_path),
        report_markdown=str(md_path),
        warnings=sum(len(r.warnings) for r in reports),
    )


def check_kind(
    cfg: ValidateSection,
    kind: str,
    spec: DataSpec,
    tokenizer,
    system_prompt: str | None = None,
    shape: str | None = None,
    out_path: Path | None = None,
    train_on: str = "all_assistant",
    suite_engine: str = "gx",
) -> CheckedData:
    """Run every single-file check for one data kind with the settings of `cfg` (also `tunegate validate`,
    which evaluates the expectation suite with pandas unless asked for GX: `suite_engine`)."""
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
        out_path=out_path,
        workers=cfg.workers,
        train_on=train_on,
        max_dropped_fraction=cfg.max_dropped_fraction,
        suite_engine=suite_engine,
    )


def _digest(path: str | Path) -> str:
    return sha256_dir(path) if Path(path).is_dir() else sha256_file(path)


def load_tokenizer(path: str, *, trust_remote_code: bool = False, chat_template: str | None = None):
    """The model's tokenizer, with `chat_template` (the record's `model.chat_template`) instead of its
    own when given."""
    tokenizer = _from_pretrained(path, trust_remote_code)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def _from_pretrained(path: str, trust_remote_code: bool):
    """AutoTokenizer's tokenizer. When tokenizer_config.json names the generic fast tokenizer
    (`TokenizersBackend`, alias `PreTrainedTokenizerFast`; SmolLM2's does) and ships no code, that is
    the class AutoTokenizer picks, so it is loaded directly: AutoTokenizer's module imports torch,
    about 2 s and 200 MB of `tunegate validate`'s start-up."""
    import json

    try:
        config = json.loads((Path(path) / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    plain = (
        config.get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast")
        and "auto_map" not in config
        and (Path(path) / "tokenizer.json").is_file()
    )
    if plain and not trust_remote_code:
        try:
            from transformers.tokenization_utils_tokenizers import TokenizersBackend
        except ImportError:  # another transformers layout: AutoTokenizer knows
            pass
        else:
            return TokenizersBackend.from_pretrained(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
