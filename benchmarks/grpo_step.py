"""Where a GRPO step's time goes on this CPU, with the KL term (`align.beta`, the demo's 0.04) and
without it (0, TRL's default), side by side: generation, reward scoring, the reference model's
log-probabilities (only with beta > 0), and the policy's forward and backward pass.

    .venv/bin/python benchmarks/grpo_step.py [--steps 4] [--betas 0.04 0] [--work /tmp/tunegate-grpo]

The alignment stage itself (`tasks.align.align_policy`, guard off) with the demo's settings: LoRA on the
top 8 layers, 2 prompts x 4 completions of up to 48 tokens a step, the demo's RL prompts with their
checks. Timing only: the policy is the base model (SmolLM2-135M) and the reward model its copy with an
untrained scalar head, so the figures say what each phase costs, not what the step learns. The phases
are timed by wrapping GRPOTrainer's own methods; the rest of a step (advantages, logging, the
optimizer) is "other".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from demo_inputs import demo_grpo, demo_inputs, timing_reward  # noqa: E402 - beside this script


def _timed(cls, name: str, clock: dict[str, float], label=None) -> None:
    original = getattr(cls, name)

    def wrapper(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            clock[label(self) if label else name] += time.perf_counter() - start

    setattr(cls, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--betas", type=float, nargs="+", default=[0.04, 0.0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/tunegate-grpo"))
    args = parser.parse_args()

    import torch
    from trl import GRPOTrainer

    from tasks.align import align_policy

    base, dataset = demo_inputs(args.work)
    reward = timing_reward(base, args.work)

    clock: dict[str, float] = defaultdict(float)
    _timed(GRPOTrainer, "_generate", clock)
    _timed(GRPOTrainer, "_calculate_rewards", clock)
    _timed(GRPOTrainer, "training_step", clock)
    # no grad: the reference model (and old log-probs, unused here); with grad: the policy's forward
    _timed(
        GRPOTrainer,
        "_get_per_token_logps_and_entropies",
        clock,
        label=lambda _: "policy_forward" if torch.is_grad_enabled() else "reference_logps",
    )
    figures = {}
    for beta in args.betas:
        clock.clear()
        cfg = demo_grpo(args.steps, beta=beta)
        start = time.perf_counter()
        align_policy(cfg, dataset, base, reward, out_dir=args.work / f"beta-{beta:g}", seed=1)
        steps = args.steps
        step = clock["training_step"] / steps
        phases = {
            "generate": clock["_generate"] / steps,
            "rewards": clock["_calculate_rewards"] / steps,
            "reference_logps": clock["reference_logps"] / steps,
            "policy_forward": clock["policy_forward"] / steps,
        }
        # training_step holds generation (inside it, every step here) and the policy's forward+backward
        phases["policy_backward_and_other"] = step - sum(phases.values())
        figures[f"beta={beta:g}"] = {
            "s_per_step": round(step, 2),
            **{k: round(v, 2) for k, v in phases.items()},
            "stage_s": round(time.perf_counter() - start, 1),
        }
        print(json.dumps({f"beta={beta:g}": figures[f"beta={beta:g}"]}), flush=True)
    print(json.dumps({"steps": args.steps, "per_step_seconds": figures}))


if __name__ == "__main__":
    main()
