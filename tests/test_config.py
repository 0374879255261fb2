"""The typed config: defaults, YAML, dotted overrides; every problem reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tunegate.config import PipelineConfig, load_config
from tunegate.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_demo_preset_loads_and_overrides_apply():
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["sft.max_steps=3", "align.method=rloo"])
    assert cfg.sft.max_steps == 3 and cfg.align.method == "rloo"
    assert cfg.registry.model_name == "brightpaw-assistant"
    assert cfg.model.trust_remote_code is False


def test_unknown_keys_are_errors_with_suggestions(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sft:\n  max_stpes: 3\n  learning_rate: -1\nbogus: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    problems = "\n".join(err.value.problems)
    assert "sft.max_stpes: unknown key; did you mean 'max_steps'?" in problems
    assert "sft.learning_rate" in problems and "greater than 0" in problems
    assert "bogus: unknown key" in problems
    assert str(path) in str(err.value)


def test_trl_passthrough_is_checked_against_trl_dataclass():
    cfg = load_config(None, ["sft.trl_args.weight_decay=0.1"])
    assert cfg.sft.trl_args == {"weight_decay": 0.1}
    with pytest.raises(ConfigError, match="not a field of trl.SFTConfig; did you mean 'weight_decay'"):
        load_config(None, ["sft.trl_args.weight_decy=0.1"])


def test_gate_needs_exactly_one_reference():
    with pytest.raises(ConfigError, match="exactly one of `threshold` or `baseline`"):
        load_config(None, ['gates=[{"metric": "fact_accuracy", "op": ">="}]'])


def test_an_adapter_registration_needs_an_adapter_on_full_weights():
    with pytest.raises(ConfigError, match="set align.save=adapter"):
        load_config(None, ["registry.format=adapter"])
    with pytest.raises(ConfigError, match="set sft.save=merged"):
        load_config(None, ["registry.format=adapter", "align.save=adapter", "sft.save=adapter"])
    cfg = load_config(None, ["registry.format=adapter", "align.save=adapter"])
    assert cfg.registry.format == "adapter"


def test_stage_gates_take_thresholds_only():
    cfg = load_config(None, ['gates=[{"metric": "eval_loss", "op": "<=", "threshold": 1, "stage": "sft"}]'])
    assert cfg.gates[0].name == "[sft] eval_loss <= 1"
    with pytest.raises(ConfigError, match="only the final evaluation has baselines"):
        load_config(None, ['gates=[{"metric": "pair_accuracy", "baseline": "base", "stage": "reward"}]'])


def test_bad_override_and_missing_file():
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(None, ["sft.max_steps"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("nope.yaml")


def test_digest_is_stable_and_sensitive():
    a, b = PipelineConfig(), PipelineConfig()
    assert a.digest() == b.digest()
    assert load_config(None, ["run.seed=1"]).digest() != a.digest()


def test_json_schema_for_the_prefect_form():
    schema = PipelineConfig.model_json_schema(by_alias=True)
    assert "validate" in schema["properties"]
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize("preset", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_preset_resolves(preset):
    cfg = load_config(ROOT / "configs" / preset)
    if cfg.run.accelerate_config:
        launcher = yaml.safe_load((ROOT / cfg.run.accelerate_config).read_text())
        assert launcher["distributed_type"] in ("FSDP", "DEEPSPEED", "MULTI_GPU")
        assert cfg.run.gpus > 1


def test_gpu_presets_cover_single_and_sharded_multi_gpu():
    single = load_config(ROOT / "configs/gpu-single.yaml")
    multi = load_config(ROOT / "configs/gpu-multi-fsdp.yaml")
    assert single.run.gpus == 1 and single.model.base_model.startswith("Qwen/")
    assert multi.run.gpus == 4 and multi.sft.mode == "full" and multi.align.method == "dpo"
    for name in ("fsdp.yaml", "deepspeed-zero2.yaml", "deepspeed-zero3.yaml"):
        assert yaml.safe_load((ROOT / "configs/accelerate" / name).read_text())["mixed_precision"] == "bf16"
