"""Shared fixtures: a tiny random Llama-style model with a locally trained tokenizer, the demo data
(small), and a pipeline config that points at both and at a temporary MLflow store."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "FALSE")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "data"))

import generate as demo_data  # noqa: E402  (data/generate.py)

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_model(path: Path, texts: list[str]) -> Path:
    """A 2-layer Llama and a byte-level BPE tokenizer trained on `texts`, with a ChatML template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def demo_rows() -> dict[str, list[dict]]:
    return demo_data.generate(seed=7, per_fact=8)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, demo_rows) -> Path:
    out = tmp_path_factory.mktemp("data")
    demo_data.write(out, demo_rows)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, demo_rows) -> Path:
    texts = [m["content"] for r in demo_rows["sft"] for m in r["messages"]]
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), texts)


@pytest.fixture(scope="session")
def prefect_api():
    """One temporary Prefect API (a server on 127.0.0.1 and its own SQLite database) for every test
    that runs flows in this process: a server per module cost ~10 s a start. The security test keeps
    its own, to scan a database that holds only its run."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def tiny_raw_config(tiny_model: Path, data_dir: Path, work: Path) -> dict:
    """A pipeline config for the tiny model: two steps per trainer, a store under `work`."""
    train = {
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "logging_steps": 1,
        "max_length": 128,
        "lora": {"r": 4, "lora_alpha": 8},
    }
    return {
        "run": {"name": "test", "seed": 1, "output_dir": str(work / "runs")},
        "model": {"base_model": str(tiny_model)},
        "data": {k: str(data_dir / f"{k}.jsonl") for k in ("sft", "preferences", "prompts", "eval")},
        "validate": {"max_length": 256},
        "sft": {**train, "learning_rate": 1e-3},
        # Two steps on a random model decide nothing: the reward-model and guard bounds are wide open.
        "reward": {**train, "min_accuracy": 0.0, "max_length_bias": 1.0, "min_accuracy_chosen_shorter": 0.0},
        "align": {
            **train,
            "num_generations": 2,
            "max_completion_length": 8,
            "guard": {"max_length_ratio": 100.0, "max_eval_loss_increase": 100.0},
        },
        "evaluate": {
            "max_new_tokens": 8,
            "batch_size": 32,
            "min_eval_rows": 20,
            "brand_prefix": demo_data.GREETING,
            "brand_suffix": demo_data.SIGNOFF,
        },
        # Gates a broken evaluator fails: two SFT steps lower the held-out loss of every row a little
        # (6.423 -> 6.419 nats, paired interval about [-0.0037, -0.0030]); scoring the base model twice,
        # or the wrong rows, gives no paired improvement and fails the first gate.
        "gates": [
            {
                "metric": "eval_loss",
                "op": "<=",
                "baseline": "base",
                "min_delta": 0.001,
                "confidence_bound": True,
            },
            {"metric": "eval_loss", "op": "<=", "baseline": "champion", "min_delta": -0.01},
        ],
        "registry": {
            "tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
            "experiment": "test",
            "model_name": "tiny-assistant",
            "artifact_root": str(work / "mlartifacts"),
        },
    }


@pytest.fixture
def tiny_config(tiny_model, data_dir, tmp_path):
    from tunegate.config import parse_config

    return parse_config(tiny_raw_config(tiny_model, data_dir, tmp_path))


@pytest.fixture(scope="session")
def stage_inputs(tmp_path_factory, tiny_model, data_dir):
    """The tiny config, base model and built dataset that stage tests train on."""
    from tasks.build import build_datasets
    from tasks.validate import validate_data
    from tunegate.artifacts import ModelArtifact
    from tunegate.config import parse_config

    work = tmp_path_factory.mktemp("stages")
    cfg = parse_config(tiny_raw_config(tiny_model, data_dir, work))
    base = ModelArtifact(path=str(tiny_model), role="base", base_model=str(tiny_model), digest="tiny")
    validated = validate_data(cfg.validate_, cfg.data, base, out_dir=work / "validate")
    dataset = build_datasets(cfg.build, validated, out_dir=work / "dataset", seed=1)
    return cfg, base, dataset, work
