"""Evaluation's greedy generation time by `evaluate.batch_size`, side by side in one process, and whether
the answers stay the same (they must: the batch size trades memory for speed only).

    .venv/bin/python benchmarks/eval_batch.py                      # the newest demo run's SFT model
    .venv/bin/python benchmarks/eval_batch.py --model DIR --eval runs/<run>/build/eval.parquet 16 128

Needs a finished demo run (`make demo`) for its defaults: the SFT model and the built eval split.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _newest(pattern: str) -> Path:
    found = sorted(ROOT.glob(pattern), key=lambda p: p.stat().st_mtime)
    if not found:
        sys.exit(f"eval_batch: nothing matches {pattern} under {ROOT}; run `make demo` first or pass it")
    return found[-1]


def main() -> None:
    from datasets import Dataset

    from tasks.evaluate import generate_answers
    from tasks.model_io import load_causal_lm
    from tunegate.config import EvaluateSection

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="model directory (default: the newest run's SFT model)")
    ap.add_argument("--eval", type=Path, help="eval split parquet (default: the newest run's)")
    ap.add_argument("--max-new-tokens", type=int, default=56, help="as the demo's evaluate.max_new_tokens")
    ap.add_argument("batch_sizes", nargs="*", type=int, default=[16, 32, 64, 128])
    args = ap.parse_args()
    model_dir = args.model or _newest("runs/*/sft/model")
    prompts = [
        r["prompt"] for r in Dataset.from_parquet(str(args.eval or _newest("runs/*/build/eval.parquet")))
    ]
    model, tokenizer = load_causal_lm(str(model_dir))
    model.eval()
    print(f"{model_dir}: {len(prompts)} prompts, up to {args.max_new_tokens} new tokens each")
    first = None
    for size in args.batch_sizes:
        cfg = EvaluateSection(max_new_tokens=args.max_new_tokens, batch_size=size)
        start = time.perf_counter()
        texts, tokens = generate_answers(model, tokenizer, prompts, cfg)
        seconds = time.perf_counter() - start
        first = first or texts
        same = sum(a == b for a, b in zip(first, texts, strict=True))
        print(
            f"batch_size {size:4d}: {seconds:6.1f} s, {tokens} tokens, {same}/{len(texts)} answers as the first"
        )


if __name__ == "__main__":
    main()
