"""A fuzzing run of the data validator's readers and per-row checks: many hostile files in every
supported format and data kind (tests/fuzz_inputs.py), each checked for crashes and for rows that go
unaccounted for. Prints how many files, rows, valid rows and findings it went through.

    .venv/bin/python benchmarks/fuzz_parsers.py --examples 2000      # per format; about a minute each
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.fuzz_inputs import FORMATS, KINDS, check_file, files, write  # noqa: E402


def _fuzzer(fmt: str, totals: Counter, examples: int):
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(kind=st.sampled_from(KINDS), content=files(fmt))
    def fuzz(kind, content):
        with tempfile.TemporaryDirectory() as tmp:
            path = write(Path(tmp) / f"input.{fmt}", content)
            totals[f"{fmt} files"] += 1
            for r in check_file(kind, path):
                totals["rows read"] += r.rows_read
                totals["valid rows"] += len(r.shapes)
                for name, tally in r.tallies.items():
                    totals[f"{name} findings"] += tally.count

    return fuzz


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000, help="files per format")
    args = parser.parse_args()
    totals: Counter = Counter()
    failures: list[str] = []
    start = time.perf_counter()
    for fmt in FORMATS:
        fuzz = _fuzzer(fmt, totals, args.examples)
        try:
            fuzz()
        except Exception as exc:  # noqa: BLE001 - the finding is the point: report it, go on
            failures.append(f"{fmt}: {type(exc).__name__}: {exc}")
    seconds = time.perf_counter() - start
    for key, value in sorted(totals.items()):
        print(f"{key:>20}: {value}")
    print(f"{'seconds':>20}: {seconds:.1f}")
    print(f"{'crashes':>20}: {len(failures)}")
    for f in failures:
        print("  ", f[:2000])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
