"""Property-based tests: hostile inputs in every supported format never crash the validator, and
every row it reads is accounted for. The longer fuzzing run is benchmarks/fuzz_parsers.py."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_checks.checks import check_data
from tests.fuzz_inputs import FORMATS, KINDS, check_file, files, write

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("fmt", FORMATS)
@FAST
@given(data=st.data())
def test_any_file_in_any_format_is_checked_without_crashing(fmt, data):
    kind = data.draw(st.sampled_from(KINDS))
    content = data.draw(files(fmt))
    with tempfile.TemporaryDirectory() as tmp:
        check_file(kind, write(Path(tmp) / f"input.{fmt}", content))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(KINDS), content=files("jsonl"))
def test_the_whole_validation_reports_instead_of_raising(kind, content):
    with tempfile.TemporaryDirectory() as tmp:
        path = write(Path(tmp) / "input.jsonl", content)
        checked = check_data(
            kind,
            str(path),
            min_rows=1,
            max_length=512,
            length_policy="drop",
            max_duplicate_fraction=0.5,
            pii_policy="warn",
            out_path=Path(tmp) / "out.jsonl",
        )
    report = checked.report
    assert report.rows_read >= report.rows_valid >= 0
    assert isinstance(report.passed, bool)
    if not report.passed:  # a failure always says what and how to fix it
        assert all(f.message and f.fix for f in report.errors)
