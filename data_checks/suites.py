"""The expectation suite over the tabular view of each data file.

Every row is reduced to a few derived columns (`n_tokens`, `norm_hash`, `shape`); one suite per data
kind states what those columns must satisfy, declared once (`expectations`). Two engines evaluate it:

- `gx`: Great Expectations (an ephemeral context). The pipeline's validate stage uses it.
- `pandas`: the same four expectations computed directly on the frame, with GX's semantics (a test
  holds the two to the same verdicts and counts). `tunegate validate` uses it by default: importing GX
  costs about 4 s of CPU and 160 MB here, for verdicts that take microseconds on a frame this size.

`checks.py` turns the outcomes into report findings, with sample locations taken from the same frame.
"""

from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)
ENGINES = ("gx", "pandas")


@dataclass
class SuiteOutcome:
    expectation: str
    success: bool
    unexpected_count: int
    observed: object = None


def expectations(
    min_rows: int, max_tokens: int | None, max_duplicate_fraction: float
) -> dict[str, tuple[str, dict[str, Any]]]:
    """The suite: check name -> (GX expectation type, its arguments)."""
    suite = {
        "min_rows": ("expect_table_row_count_to_be_between", {"min_value": min_rows}),
        "duplicates": (
            "expect_column_proportion_of_unique_values_to_be_between",
            {"column": "norm_hash", "min_value": 1.0 - max_duplicate_fraction},
        ),
        "single_shape": (
            "expect_column_unique_value_count_to_be_between",
            {"column": "shape", "max_value": 1},
        ),
    }
    if max_tokens is not None:
        suite["length"] = (
            "expect_column_values_to_be_between",
            {"column": "n_tokens", "max_value": max_tokens},
        )
    return suite


def run_suite(
    kind: str,
    frame: pd.DataFrame,
    *,
    min_rows: int,
    max_tokens: int | None,
    max_duplicate_fraction: float,
    engine: str = "gx",
) -> dict[str, SuiteOutcome]:
    """Validate `frame` with the suite for `kind`; returns outcomes keyed by check name."""
    suite = expectations(min_rows, max_tokens, max_duplicate_fraction)
    if engine == "pandas":
        return {check: _pandas_outcome(frame, name, args) for check, (name, args) in suite.items()}
    if engine != "gx":
        raise ValueError(f"unknown suite engine {engine!r}; use one of {', '.join(ENGINES)}")
    return _gx_outcomes(kind, frame, suite)


def _pandas_outcome(frame: pd.DataFrame, name: str, args: dict[str, Any]) -> SuiteOutcome:
    """One expectation evaluated as GX evaluates it (no nulls occur in these columns)."""
    low, high = args.get("min_value"), args.get("max_value")

    def within(value) -> bool:
        return (low is None or value >= low) and (high is None or value <= high)

    if name == "expect_table_row_count_to_be_between":
        return SuiteOutcome(name, within(len(frame)), 0, len(frame))
    column = frame[args["column"]]
    if name == "expect_column_proportion_of_unique_values_to_be_between":
        observed = column.nunique() / len(column) if len(column) else 0
        return SuiteOutcome(name, within(observed), 0, observed)
    if name == "expect_column_unique_value_count_to_be_between":
        observed = int(column.nunique())
        return SuiteOutcome(name, within(observed), 0, observed)
    if name == "expect_column_values_to_be_between":
        outside = int((~column.between(low if low is not None else -float("inf"), high)).sum())
        return SuiteOutcome(name, outside == 0, outside, None)
    raise ValueError(f"no pandas evaluation for {name}")


@functools.lru_cache(maxsize=1)
def _context():
    import great_expectations as gx

    return gx.get_context(mode="ephemeral")


def _gx_outcomes(
    kind: str, frame: pd.DataFrame, suite: dict[str, tuple[str, dict[str, Any]]]
) -> dict[str, SuiteOutcome]:
    import great_expectations as gx
    import great_expectations.expectations as gxe

    context = _context()
    name = f"tunegate_{kind}_{id(frame)}"
    source = context.data_sources.add_or_update_pandas(name)
    batch = (
        source.add_dataframe_asset(name)
        .add_batch_definition_whole_dataframe("all")
        .get_batch(batch_parameters={"dataframe": frame})
    )
    classes = {
        "expect_table_row_count_to_be_between": gxe.ExpectTableRowCountToBeBetween,
        "expect_column_proportion_of_unique_values_to_be_between": (
            gxe.ExpectColumnProportionOfUniqueValuesToBeBetween
        ),
        "expect_column_unique_value_count_to_be_between": gxe.ExpectColumnUniqueValueCountToBeBetween,
        "expect_column_values_to_be_between": gxe.ExpectColumnValuesToBeBetween,
    }
    gx_suite = gx.ExpectationSuite(name=name, expectations=[classes[t](**a) for t, a in suite.values()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = batch.validate(
            gx_suite,
            # Verdicts and counts only: the offending rows come from the frame itself (checks.py),
            # so a million-row file never builds GX's full unexpected-index lists.
            result_format={"result_format": "SUMMARY"},
        )
    context.data_sources.delete(name)
    by_type = {r.expectation_config.type: r for r in result.results}
    outcomes = {}
    for check, (expectation, _) in suite.items():
        r = by_type[expectation]
        res = r.result or {}
        outcomes[check] = SuiteOutcome(
            expectation=expectation,
            success=bool(r.success),
            unexpected_count=int(res.get("unexpected_count") or 0),
            observed=res.get("observed_value"),
        )
    return outcomes
