"""Great Expectations suites over the tabular view of each data file.

Every row is reduced to a few derived columns (`where`, `n_tokens`, `norm_hash`, `shape`); one suite per
data kind states what those columns must satisfy. GX gives each verdict and count; `checks.py` turns
them into report findings, with sample locations taken from the same frame.
"""

from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass

import pandas as pd

log = logging.getLogger(__name__)


@dataclass
class SuiteOutcome:
    expectation: str
    success: bool
    unexpected_count: int
    observed: object = None


@functools.lru_cache(maxsize=1)
def _context():
    import great_expectations as gx

    return gx.get_context(mode="ephemeral")


def run_suite(
    kind: str, frame: pd.DataFrame, *, min_rows: int, max_tokens: int | None, max_duplicate_fraction: float
) -> dict[str, SuiteOutcome]:
    """Validate `frame` with the suite for `kind`; returns outcomes keyed by check name."""
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
    expectations = {
        "min_rows": gxe.ExpectTableRowCountToBeBetween(min_value=min_rows),
        "duplicates": gxe.ExpectColumnProportionOfUniqueValuesToBeBetween(
            column="norm_hash", min_value=1.0 - max_duplicate_fraction
        ),
        "single_shape": gxe.ExpectColumnUniqueValueCountToBeBetween(column="shape", max_value=1),
    }
    if max_tokens is not None:
        expectations["length"] = gxe.ExpectColumnValuesToBeBetween(column="n_tokens", max_value=max_tokens)
    suite = gx.ExpectationSuite(name=name, expectations=list(expectations.values()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = batch.validate(
            suite,
            # Verdicts and counts only: the offending rows come from the frame itself (checks.py),
            # so a million-row file never builds GX's full unexpected-index lists.
            result_format={"result_format": "SUMMARY"},
        )
    context.data_sources.delete(name)
    outcomes = {}
    by_type = {r.expectation_config.type: r for r in result.results}
    for check, expectation in expectations.items():
        r = by_type[expectation.expectation_type]
        res = r.result or {}
        outcomes[check] = SuiteOutcome(
            expectation=expectation.expectation_type,
            success=bool(r.success),
            unexpected_count=int(res.get("unexpected_count") or 0),
            observed=res.get("observed_value"),
        )
    return outcomes
