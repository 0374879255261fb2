"""The whole pipeline against plain TRL scripts doing the same training, on this machine.

    .venv/bin/python benchmarks/pipeline_overhead.py [--work /tmp/tunegate-pipeline-overhead] [overrides ...]

Plain side: three scripts as a practitioner writes them with TRL and PEFT directly, with the demo
config's settings (`configs/demo.yaml`, plus any dotted overrides such as `sft.max_steps=20`): SFT on
the built SFT split, a reward model on the SFT model, GRPO on the SFT model scored by that reward
model; each loads its model, trains and saves merged weights. No validation, evaluation or registry.

tunegate side: `tunegate run` with the same config as a fresh process on a fresh store: validation,
build, the three training stages (checkpoints, guards, digests), evaluation of base and candidate,
gates, registration with a smoke test. The training stages' own times come from their MLflow runs
(`stage_seconds`), so the table shows both the training overhead (same work) and what the rest adds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def plain_sft(cfg, base: str, train: str, out: Path) -> float:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    start = time.perf_counter()
    set_seed(cfg.run.seed)
    s = cfg.sft
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**_common(s, out, cfg.run.seed), max_length=s.max_length),
        train_dataset=Dataset.from_parquet(train),
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=s.lora.r, lora_alpha=s.lora.lora_alpha, target_modules="all-linear", task_type="CAUSAL_LM"
        ),
    )
    trainer.train()
    trainer.model.merge_and_unload().save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    return time.perf_counter() - start


def plain_reward(cfg, sft: Path, pairs: str, out: Path) -> float:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed
    from trl import RewardConfig, RewardTrainer

    start = time.perf_counter()
    set_seed(cfg.run.seed)
    r = cfg.reward
    tokenizer = AutoTokenizer.from_pretrained(sft)
    model = AutoModelForSequenceClassification.from_pretrained(sft, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    trainer = RewardTrainer(
        model=model,
        args=RewardConfig(**_common(r, out, cfg.run.seed), max_length=r.max_length),
        train_dataset=Dataset.from_parquet(pairs),
        processing_class=tokenizer,
        peft_config=_lora(r.lora, model, "SEQ_CLS", LoraConfig),
    )
    trainer.train()
    trainer.model.merge_and_unload().save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    return time.perf_counter() - start


def plain_grpo(cfg, sft: Path, reward: Path, prompts: str, out: Path) -> float:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, set_seed
    from trl import GRPOConfig, GRPOTrainer

    start = time.perf_counter()
    set_seed(cfg.run.seed)
    a = cfg.align
    tokenizer = AutoTokenizer.from_pretrained(sft)
    model = AutoModelForCausalLM.from_pretrained(sft, dtype=torch.float32)
    reward_tokenizer = AutoTokenizer.from_pretrained(reward)
    reward_model = AutoModelForSequenceClassification.from_pretrained(
        reward, num_labels=1, dtype=torch.float32
    )
    reward_model.config.pad_token_id = reward_tokenizer.pad_token_id or reward_tokenizer.eos_token_id
    args = GRPOConfig(
        **_common(a, out, cfg.run.seed),
        beta=a.beta,
        num_generations=a.num_generations,
        max_completion_length=a.max_completion_length,
        temperature=a.temperature,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[reward_model],
        args=args,
        train_dataset=Dataset.from_parquet(prompts).select_columns(["prompt"]),
        processing_class=tokenizer,
        reward_processing_classes=[reward_tokenizer],
        peft_config=_lora(a.lora, model, "CAUSAL_LM", LoraConfig),
    )
    trainer.train()
    trainer.model.merge_and_unload().save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    return time.perf_counter() - start


def _common(section, out: Path, seed: int) -> dict:
    return {
        "output_dir": str(out / "trainer"),
        "max_steps": section.max_steps,
        "learning_rate": section.learning_rate,
        "per_device_train_batch_size": section.per_device_train_batch_size,
        "warmup_steps": section.warmup_steps,
        "lr_scheduler_type": section.lr_scheduler_type,
        "logging_steps": section.logging_steps,
        "seed": seed,
        "use_cpu": True,
        "bf16": False,
        "gradient_checkpointing": False,
        "save_strategy": "no",
        "report_to": [],
        "disable_tqdm": True,
    }


def _lora(lora, model, task: str, config_cls):
    """LoRA on every linear layer of the top `top_layers` blocks, as the demo config asks."""
    layers, targets = None, "all-linear"
    if lora.top_layers:
        n = model.config.num_hidden_layers
        layers = list(range(n - lora.top_layers, n))
        # PEFT restricts layers only with explicit module names: Llama's linear layers
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return config_cls(
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        target_modules=targets,
        layers_to_transform=layers,
        task_type=task,
    )


def pipeline_run(work: Path, overrides: list[str]) -> tuple[float, dict[str, float], str]:
    work.mkdir(parents=True, exist_ok=True)
    store = f"sqlite:///{work / 'mlflow.db'}"
    argv = [
        "run",
        "--config",
        str(ROOT / "configs" / "demo.yaml"),
        *overrides,
        f"run.output_dir={work / 'runs'}",
        f"registry.tracking_uri={store}",
        f"registry.artifact_root={work / 'mlartifacts'}",
    ]
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    start = time.perf_counter()
    code = "import sys; from flows.cli import main; sys.exit(main(sys.argv[1:]))"
    out = subprocess.run(
        [sys.executable, "-c", code, *argv], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(
            f"tunegate run failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        )
    from mlflow import MlflowClient

    from tunegate.config import load_config

    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name(
        load_config(ROOT / "configs" / "demo.yaml", overrides).registry.experiment
    )
    stages = {}
    for r in client.search_runs([experiment.experiment_id]):
        stage = r.data.tags.get("tunegate.stage")
        if stage and "stage_seconds" in r.data.metrics:
            stages[stage] = stages.get(stage, 0.0) + r.data.metrics["stage_seconds"]
    return seconds, stages, out.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/tunegate-pipeline-overhead"))
    parser.add_argument("overrides", nargs="*", help="dotted overrides of configs/demo.yaml")
    args = parser.parse_args()
    import shutil

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)

    import peft  # noqa: F401 - imported before any timing, for both sides alike
    import trl  # noqa: F401

    from tasks.base_model import prepare_base_model
    from tasks.build import build_datasets
    from tasks.validate import validate_data
    from tunegate.config import load_config

    cfg = load_config(ROOT / "configs" / "demo.yaml", args.overrides)
    base = prepare_base_model(cfg.model)  # converted once, outside both timings
    validated = validate_data(cfg.validate_, cfg.data, base, out_dir=args.work / "validate")
    dataset = build_datasets(cfg.build, validated, out_dir=args.work / "dataset", seed=cfg.run.seed)
    split = {k: f.path for k, f in dataset.splits.items()}

    plain = {}
    plain["sft"] = plain_sft(cfg, base.path, split["sft_train"], args.work / "plain-sft")
    print(f"plain SFT: {plain['sft']:.1f} s", flush=True)
    sft_model = args.work / "plain-sft" / "model"
    plain["reward-model"] = plain_reward(cfg, sft_model, split["pref_train"], args.work / "plain-reward")
    print(f"plain reward model: {plain['reward-model']:.1f} s", flush=True)
    plain["align"] = plain_grpo(
        cfg, sft_model, args.work / "plain-reward" / "model", split["prompts"], args.work / "plain-grpo"
    )
    print(f"plain GRPO: {plain['align']:.1f} s", flush=True)

    wall, stages, stdout = pipeline_run(args.work / "tunegate", args.overrides)
    training = ("sft", "reward-model", "align")
    plain_total = sum(plain.values())
    stage_total = sum(stages.get(s, 0.0) for s in training)
    summary = {
        "overrides": args.overrides,
        "plain_seconds": {k: round(v, 1) for k, v in plain.items()},
        "plain_total_seconds": round(plain_total, 1),
        "tunegate_stage_seconds": {k: round(v, 1) for k, v in sorted(stages.items())},
        "tunegate_training_seconds": round(stage_total, 1),
        "training_overhead_pct": round(100 * (stage_total - plain_total) / plain_total, 1),
        "tunegate_wall_seconds": round(wall, 1),
        "outcome": stdout.strip().splitlines()[-1] if stdout.strip() else "",
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
