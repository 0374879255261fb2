"""tunegate's SFT stage against a plain TRL script doing the same work, on this CPU (issue 4: the
stage must be within 5% of the plain script's tokens/s).

    python benchmarks/sft_overhead.py [--steps 20] [--repeats 3] [--work /tmp/tunegate-overhead]

Both sides: SmolLM2-135M-Instruct (the embedded base), the demo's built SFT split, LoRA r=16 on all
linear layers, batch 8, the same seed and TRL settings; each loads the model, trains, evaluates the
held-out split and saves merged weights. Runs alternate (plain, stage, plain, stage, ...) so drift
hits both; the figure is tokens trained per second of wall time for the whole call, median of the
repeats, and the same for the training loop alone (the trainer's own runtime). The stage's extras
(finite-loss guard, trained-weights check, atomic save, digest of the result) are inside its time.
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


def plain_trl(
    base_path: str, train_path: str, eval_path: str, out: Path, steps: int
) -> tuple[float, int, float]:
    """What a practitioner writes with TRL and PEFT directly."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    start = time.perf_counter()
    set_seed(1)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    args = SFTConfig(
        output_dir=str(out / "trainer"),
        max_steps=steps,
        learning_rate=8e-4,
        per_device_train_batch_size=8,
        warmup_steps=2,
        lr_scheduler_type="cosine",
        logging_steps=10,
        max_length=256,
        seed=1,
        data_seed=1,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_parquet(train_path),
        eval_dataset=Dataset.from_parquet(eval_path),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    train_seconds = trainer.train().metrics["train_runtime"]
    trainer.evaluate()
    trainer.model.merge_and_unload().save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    tokens = _tokens(trainer.state.log_history)
    return time.perf_counter() - start, tokens, tokens / train_seconds


def tunegate_stage(base, dataset, out: Path, steps: int) -> tuple[float, int, float]:
    from tasks.sft import train_sft

    cfg = demo_sft(steps, logging_steps=10)
    start = time.perf_counter()
    sft = train_sft(cfg, dataset, base, out_dir=out, seed=1)
    return time.perf_counter() - start, int(sft.metrics["train_tokens"]), sft.metrics["train_tokens_per_s"]


def _tokens(history: list[dict]) -> int:
    seen = [h["num_tokens"] for h in history if "num_tokens" in h and "eval_loss" not in h]
    return int(float(seen[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tunegate-overhead"))
    args = parser.parse_args()

    import peft  # noqa: F401 - imported before any timing, for both sides alike
    import trl  # noqa: F401

    base, dataset = demo_inputs(args.work)
    train_path, eval_path = dataset.splits["sft_train"].path, dataset.splits["sft_eval"].path

    runs = {"plain_trl": [], "tunegate_stage": []}
    for i in range(args.repeats):
        for name in ("plain_trl", "tunegate_stage"):
            out = args.work / f"{name}-{i}"
            if name == "plain_trl":
                run = plain_trl(base.path, train_path, eval_path, out, args.steps)
            else:
                run = tunegate_stage(base, dataset, out, args.steps)
            seconds, tokens, loop_tps = run
            runs[name].append((tokens / seconds, loop_tps))
            print(
                f"{name:15} run {i + 1}: {tokens} tokens, {seconds:.1f} s whole call = {tokens / seconds:.0f} tokens/s; "
                f"training loop {loop_tps:.0f} tokens/s",
                flush=True,
            )
    summary = {"steps": args.steps, "repeats": args.repeats}
    for j, what in enumerate(("whole_call", "training_loop")):
        plain, stage = (statistics.median(r[j] for r in runs[k]) for k in ("plain_trl", "tunegate_stage"))
        summary[what] = {
            "plain_trl_tokens_per_s": round(plain, 1),
            "tunegate_tokens_per_s": round(stage, 1),
            "overhead_pct": round(100 * (plain - stage) / plain, 2),
        }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
