"""The SFT stage's training loop with padded batches (the demo's) and best-fit packing (padding-free:
rows laid end to end, attention kept within each row by position ids), side by side on this CPU:
seconds per step and tokens per second.

    .venv/bin/python benchmarks/sft_padding.py [--steps 10] [--repeats 1] [--work /tmp/tunegate-padding]

Both layouts run the stage itself (`tasks.sft.train_sft`) with the demo's settings (SmolLM2-135M,
the demo's built SFT split, LoRA r=16 on all linear layers, batch 8, lr 8e-4) and the same seed, in
alternation (`--repeats`) so that drift hits both. A packed step holds about three times the rows of a
padded one (256-token sequences of ~81-token conversations), so packing is compared by tokens per
second, not per step. (TRL's padding-free batches without packing refuse a `max_length`, which the
stage always sets; packing is the padding-free layout the stage offers, `sft.packing`.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from demo_inputs import demo_inputs, demo_sft  # noqa: E402 - beside this script

LAYOUTS = {
    "padded": {},
    "packed": {"packing": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tunegate-padding"))
    args = parser.parse_args()

    from tasks.sft import train_sft

    base, dataset = demo_inputs(args.work)

    results: dict[str, list[dict]] = {name: [] for name in LAYOUTS}
    for i in range(args.repeats):
        for name, layout in LAYOUTS.items():
            cfg = demo_sft(args.steps, **layout)
            start = time.perf_counter()
            m = train_sft(cfg, dataset, base, out_dir=args.work / f"{name}-{i}", seed=1).metrics
            row = {
                "stage_s": round(time.perf_counter() - start, 1),
                "s_per_step": round(m["train_seconds"] / args.steps, 2),
                "tokens_per_s": round(m["train_tokens_per_s"], 1),
                "train_loss": round(m["train_loss"], 4),
                "eval_loss": round(m["eval_loss"], 4),
            }
            results[name].append(row)
            print(f"{name:13} run {i + 1}: {json.dumps(row)}", flush=True)
    summary = {
        name: {k: statistics.median(r[k] for r in rows) for k in ("s_per_step", "tokens_per_s", "train_loss")}
        for name, rows in results.items()
    }
    print(json.dumps({"steps": args.steps, "repeats": args.repeats, "median": summary}))


if __name__ == "__main__":
    main()
