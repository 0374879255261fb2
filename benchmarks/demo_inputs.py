"""What the training benchmarks start from: the packaged base model and the demo's generated data
(`make data`), validated and built into splits as the pipeline builds them."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def demo_inputs(work: Path):
    """(base model artifact, instruction dataset) for the demo's data, built under `work`."""
    from tasks.base_model import prepare_base_model
    from tasks.build import build_datasets
    from tasks.validate import validate_data
    from tunegate.config import BuildSection, DataSection, ModelSection, ValidateSection

    base = prepare_base_model(ModelSection())
    files = {
        k: str(ROOT / "data" / "generated" / f"{k}.jsonl") for k in ("sft", "preferences", "prompts", "eval")
    }
    validated = validate_data(
        ValidateSection(max_length=256), DataSection(**files), base, out_dir=work / "validate"
    )
    return base, build_datasets(BuildSection(), validated, out_dir=work / "dataset", seed=42)


def demo_sft(steps: int, **overrides):
    """The demo's SFT settings (configs/demo.yaml) for a `steps`-step benchmark run, without
    checkpoints; `overrides` replace any field (e.g. packing=True)."""
    from tunegate.config import SftSection

    settings = {
        "learning_rate": 8e-4,
        "max_steps": steps,
        "per_device_train_batch_size": 8,
        "warmup_steps": 2,
        "lr_scheduler_type": "cosine",
        "logging_steps": steps,
        "max_length": 256,
        "checkpoint_steps": 0,
        "lora": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
    }
    return SftSection(**{**settings, **overrides})


def demo_grpo(steps: int, **overrides):
    """The demo's GRPO settings for a `steps`-step benchmark run: LoRA on the top 8 layers, 2 prompts x
    4 completions of up to 48 tokens a step, no checkpoints, the reward-hacking guard off."""
    from tunegate.config import AlignSection

    settings = {
        "learning_rate": 5e-5,
        "max_steps": steps,
        "per_device_train_batch_size": 8,
        "num_generations": 4,
        "max_completion_length": 48,
        "beta": 0.0,
        "logging_steps": 1,
        "checkpoint_steps": 0,
        "lora": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear", "top_layers": 8},
        "guard": {"enabled": False},
    }
    return AlignSection(**{**settings, **overrides})


def timing_reward(base, work: Path):
    """A reward model for timing only: the base model with an untrained scalar head, saved under
    `work` once."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tunegate.artifacts import ModelArtifact

    reward_dir = work / "reward"
    if not reward_dir.exists():
        head = AutoModelForSequenceClassification.from_pretrained(
            base.path, num_labels=1, dtype=torch.float32
        )
        head.save_pretrained(reward_dir)
        AutoTokenizer.from_pretrained(base.path).save_pretrained(reward_dir)
    return ModelArtifact(
        path=str(reward_dir), role="reward", base_model=base.base_model, digest="timing-only"
    )
