"""Validate and build a large SFT file: wall time and peak memory (issue 3's target: 1M rows, 3 min, 4 GiB).

    python benchmarks/validate_scale.py --rows 1000000 [--work /tmp/tunegate-scale] [--workers 0]

Generates unique conversations in the demo's shape, then runs the validate stage's SFT checks with the
real SmolLM2 tokenizer and chat template (streamed, in worker processes), and the build stage, timing
each. Peak memory is the largest sum of resident memory over this process and its workers, sampled
every 50 ms.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from pathlib import Path

import psutil

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


class PeakMemory:
    """Largest total RSS of this process and its children while running."""

    def __init__(self, every: float = 0.05) -> None:
        self.every, self.peak, self._stop = every, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.every)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tunegate-scale"))
    parser.add_argument("--workers", type=int, default=0, help="0: one per core (the stage's default)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    src = args.work / f"sft-{args.rows}.jsonl"
    if not src.exists():
        t = time.perf_counter()
        write_rows(src, args.rows)
        size = src.stat().st_size / 2**20
        print(f"generated {args.rows} rows in {time.perf_counter() - t:.1f} s ({size:.0f} MiB)")

    from transformers import AutoTokenizer

    from tasks.base_model import prepare_base_model
    from tasks.build import build_datasets
    from tasks.validate import check_kind
    from tunegate.artifacts import DataFile, ValidatedData, sha256_file
    from tunegate.config import BuildSection, ModelSection, ValidateSection

    tokenizer = AutoTokenizer.from_pretrained(prepare_base_model(ModelSection()).path)
    cfg = ValidateSection(min_rows={"sft": 1}, workers=args.workers)
    with PeakMemory() as mem:
        t = time.perf_counter()
        checked = check_kind(cfg, "sft", str(src), tokenizer, out_path=args.work / "validated" / "sft.jsonl")
        validate_s = time.perf_counter() - t
        assert checked.report.passed, checked.report.to_text()
        validated = ValidatedData(
            files={
                "sft": DataFile(
                    kind="sft",
                    path=str(checked.path),
                    rows=checked.report.rows_valid,
                    sha256=sha256_file(checked.path),
                )
            },
            counts={"sft": {"read": checked.report.rows_read, "kept": checked.report.rows_valid}},
            sources={str(src): sha256_file(src)},
            report_json="",
            report_markdown="",
        )
        t = time.perf_counter()
        built = build_datasets(BuildSection(), validated, out_dir=args.work / "dataset", seed=0)
        build_s = time.perf_counter() - t
    print(
        json.dumps(
            {
                "rows": args.rows,
                "validate_s": round(validate_s, 1),
                "build_s": round(build_s, 1),
                "total_s": round(validate_s + build_s, 1),
                "peak_rss_gib": round(mem.peak / 2**30, 2),
                "rows_per_s": round(args.rows / (validate_s + build_s)),
                "outputs": {k: f.rows for k, f in built.splits.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
