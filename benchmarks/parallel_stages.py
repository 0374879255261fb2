"""The reward model and the judge one after the other (in this process, every core: what the pipeline
does by default) against side by side (`run.parallel_stages`: two child processes, the cores split
between them), with the demo's reward settings, timed in one run.

    .venv/bin/python benchmarks/parallel_stages.py [--max-steps 40] [--work /tmp/tunegate-parallel]

Both start from the base model (SmolLM2-135M) as their backbone instead of the demo's SFT model: the
same architecture and sizes, so the same cost; the figures say what each mode takes, and that both
modes train the same models (pairwise accuracy on the held-out pairs, which differ only by float
rounding between thread counts; the reward-model checks are off, being tuned for the SFT model's
answers). The side-by-side figure includes each child's start: importing torch,
transformers and TRL again.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from demo_inputs import demo_inputs  # noqa: E402 - beside this script


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=None, help="default: the demo's reward.max_steps")
    parser.add_argument("--work", type=Path, default=Path("/tmp/tunegate-parallel"))
    args = parser.parse_args()

    import torch

    from tasks.launch import launch, launched
    from tunegate.config import load_config

    cfg = load_config(ROOT / "configs" / "demo.yaml").reward
    # Timing, not a verdict: the base model is not the SFT model these checks are tuned for.
    checks_off = {"min_accuracy": 0.0, "max_length_bias": 1.0, "min_accuracy_chosen_shorter": 0.0}
    cfg = cfg.model_copy(update={**checks_off, "max_steps": args.max_steps or cfg.max_steps})
    base, dataset = demo_inputs(args.work)
    threads = torch.get_num_threads()
    stages = ("reward-model", "judge-model")

    def kwargs(mode: str, stage: str) -> dict:
        out = args.work / mode / stage
        shutil.rmtree(out, ignore_errors=True)
        return {"out_dir": out, "seed": 42, "checkpoint_dir": out / "checkpoints"}

    results: dict[str, dict] = {}
    start = time.perf_counter()
    made = [launched(s)(cfg, dataset, base, **kwargs("sequential", s)) for s in stages]
    results["sequential"] = _figures(time.perf_counter() - start, made, f"in this process, {threads} threads")

    from concurrent.futures import ThreadPoolExecutor

    share = max(1, threads // len(stages))
    start = time.perf_counter()
    with ThreadPoolExecutor(len(stages)) as pool:
        futures = [
            pool.submit(
                launch,
                s,
                (cfg, dataset, base),
                kwargs("parallel", s),
                gpus=1,
                accelerate_config=None,
                threads=share,
            )
            for s in stages
        ]
        made = [f.result() for f in futures]
    results["parallel"] = _figures(
        time.perf_counter() - start, made, f"2 child processes, {share} thread(s) each"
    )

    seq, par = results["sequential"]["seconds"], results["parallel"]["seconds"]
    print(json.dumps(results | {"speedup": round(seq / par, 2), "max_steps": cfg.max_steps}, indent=2))


def _figures(seconds: float, made: list, how: str) -> dict:
    return {
        "seconds": round(seconds, 1),
        "how": how,
        "pair_accuracy": {m.role: round(m.metrics.get("pair_accuracy", float("nan")), 4) for m in made},
        "train_seconds": {m.role: round(m.metrics.get("train_seconds", float("nan")), 1) for m in made},
    }


if __name__ == "__main__":
    main()
