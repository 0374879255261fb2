"""TRL's fused LM head on the CPU against tunegate's dense one (`tasks/lm_head.py`), side by side in
one process: seconds per step of the SFT and GRPO stages, and the figures each logs.

    .venv/bin/python benchmarks/lm_head.py [--steps 6] [--grpo-steps 3] [--repeats 1] [--work /tmp/tunegate-lm-head]

Both heads run the stages themselves with the demo's settings (SmolLM2-135M, the demo's built data):
SFT as in `sft_padding.py` (LoRA r=16 on all linear layers, batch 8), GRPO as in `grpo_step.py` (LoRA on
the top 8 layers, 2 prompts x 4 completions of up to 48 tokens, no KL term, a timing-only reward
model). The runs alternate (`--repeats`) so that this machine's drift hits both; the same seed, so the
losses should agree to rounding.
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

from demo_inputs import demo_grpo, demo_inputs, demo_sft, timing_reward  # noqa: E402 - beside this script

HEADS = ("trl", "dense")


def _head(name: str) -> None:
    """Make the stages use `name`'s head: they install the dense one themselves, so TRL's is kept by
    making that call a no-op."""
    import tasks.align
    import tasks.sft
    from tasks import lm_head

    if name == "trl":
        lm_head.restore_trl()
        tasks.sft.use_dense_on_cpu = tasks.align.use_dense_on_cpu = lambda: False
    else:
        tasks.sft.use_dense_on_cpu = tasks.align.use_dense_on_cpu = lm_head.use_dense_on_cpu


def _sft(base, dataset, steps: int, out: Path) -> dict:
    from tasks.sft import train_sft

    m = train_sft(demo_sft(steps), dataset, base, out_dir=out, seed=1).metrics
    return {
        "s_per_step": round(m["train_seconds"] / steps, 2),
        "peak_mib": round(m["peak_memory_mib"]),
        "train_loss": round(m["train_loss"], 4),
        "eval_loss": round(m["eval_loss"], 4),
    }


def _grpo(base, dataset, reward, steps: int, out: Path) -> dict:
    from tasks.align import align_policy

    m = align_policy(demo_grpo(steps), dataset, base, reward, out_dir=out, seed=1).metrics
    return {
        "s_per_step": round(m["train_seconds"] / steps, 2),
        "peak_mib": round(m["peak_memory_mib"]),
        "reward_last": round(m["reward_last"], 4),
        "entropy_last": round(m["entropy_last"], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="SFT steps a run (0: skip SFT)")
    parser.add_argument("--grpo-steps", type=int, default=3, help="GRPO steps a run (0: skip GRPO)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tunegate-lm-head"))
    args = parser.parse_args()

    base, dataset = demo_inputs(args.work)
    reward = timing_reward(base, args.work) if args.grpo_steps else None
    results: dict[str, list[dict]] = {}
    for i in range(args.repeats):
        for head in HEADS:
            _head(head)
            for stage, steps in (("sft", args.steps), ("grpo", args.grpo_steps)):
                if not steps:
                    continue
                out = args.work / f"{stage}-{head}-{i}-{time.time_ns()}"
                if stage == "sft":
                    row = _sft(base, dataset, steps, out)
                else:
                    row = _grpo(base, dataset, reward, steps, out)
                results.setdefault(f"{stage}/{head}", []).append(row)
                print(f"{stage:4} {head:5} run {i + 1}: {json.dumps(row)}", flush=True)
    median = {k: statistics.median(r["s_per_step"] for r in rows) for k, rows in results.items()}
    speedup = {
        stage: round(median[f"{stage}/trl"] / median[f"{stage}/dense"], 2)
        for stage in ("sft", "grpo")
        if f"{stage}/trl" in median
    }
    print(json.dumps({"median_s_per_step": median, "speedup": speedup}))


if __name__ == "__main__":
    main()
