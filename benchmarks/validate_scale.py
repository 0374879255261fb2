"""Validate and build a large SFT file: wall time and peak memory (issue 3's target: 1M rows, 3 min, 4 GiB).

    python benchmarks/validate_scale.py --rows 1000000 [--work /tmp/tunegate-scale]

Generates unique conversations in the demo's shape, then runs the validate stage's SFT checks with the
real SmolLM2 tokenizer and chat template, and the build stage, timing each. Peak RSS is the process's.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "data"))


def write_rows(path: Path, n: int, seed: int = 1) -> None:
    import generate

    rng = random.Random(seed)
    facts = list(generate.FACTS.values())
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            answer, _, questions, _ = facts[i % len(facts)]
            q = f"{rng.choice(generate.OPENERS)}{rng.choice(questions)} (ticket {i})"
            row = {"messages": generate.conversation(q, generate.on_brand(answer))}
            f.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tunegate-scale"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    src = args.work / f"sft-{args.rows}.jsonl"
    if not src.exists():
        t = time.perf_counter()
        write_rows(src, args.rows)
        print(
            f"generated {args.rows} rows in {time.perf_counter() - t:.1f} s ({src.stat().st_size / 2**20:.0f} MiB)"
        )

    from transformers import AutoTokenizer

    from data_checks.checks import check_data
    from tasks.base_model import prepare_base_model
    from tunegate.config import ModelSection

    tokenizer = AutoTokenizer.from_pretrained(prepare_base_model(ModelSection()).path)
    t = time.perf_counter()
    checked = check_data(
        "sft",
        str(src),
        min_rows=1,
        max_length=512,
        length_policy="drop",
        max_duplicate_fraction=0.05,
        pii_policy="warn",
        tokenizer=tokenizer,
    )
    validate_s = time.perf_counter() - t
    assert checked.report.passed, checked.report.to_text()

    from tasks.build import _dedupe, _write_parquet

    t = time.perf_counter()
    unique = _dedupe(checked.rows)
    _write_parquet(unique, args.work / "sft_train.parquet")
    build_s = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(
        json.dumps(
            {
                "rows": args.rows,
                "validate_s": round(validate_s, 1),
                "build_s": round(build_s, 1),
                "total_s": round(validate_s + build_s, 1),
                "peak_rss_gib": round(peak, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
