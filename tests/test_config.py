"""The typed config: defaults, YAML, dotted overrides; every problem reported at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from trl import SFTConfig

from tasks.trainer_args import (
    OWNED,
    SET_INSTEAD,
    TRL_CONFIGS,
    check_trainer_args,
    trainer_config,
    tunegate_kwargs,
)
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


def checked(*overrides: str) -> PipelineConfig:
    """What the flow does first: load, then build every trainer config the run will use."""
    cfg = load_config(None, list(overrides))
    if problems := check_trainer_args(cfg):
        raise ConfigError(problems)
    return cfg


def test_trl_passthrough_reaches_the_trl_config_and_unknown_names_are_errors(tmp_path):
    cfg = checked("sft.trl_args.weight_decay=1e-4")  # YAML reads 1e-4 as text: TRL's type decides
    args = trainer_config("sft", cfg.sft, output_dir=tmp_path, seed=cfg.run.seed, cuda=False)
    assert isinstance(args, SFTConfig) and args.weight_decay == 1e-4
    assert args.learning_rate == cfg.sft.learning_rate and args.output_dir == str(tmp_path)
    with pytest.raises(ConfigError, match="not a field of trl.SFTConfig; did you mean 'weight_decay'"):
        checked("sft.trl_args.weight_decy=0.1")


def test_a_lifted_trl_field_has_one_name_only():
    with pytest.raises(ConfigError, match=r"sft.trl_args.learning_rate: set sft.learning_rate instead"):
        checked("sft.trl_args.learning_rate=0.1")
    with pytest.raises(ConfigError, match=r"align.trl_args.beta: set align.beta instead"):
        checked("align.trl_args.beta=0.5")


def test_reward_max_length_under_trl_args_fails_at_load_not_after_sft():
    with pytest.raises(ConfigError, match=r"reward.trl_args.max_length: set reward.max_length instead"):
        checked("reward.trl_args.max_length=64")


def test_settings_tunegate_owns_are_refused_with_the_reason():
    with pytest.raises(ConfigError, match=r"sft.trl_args.output_dir: .*keyed by content so a run can resume"):
        checked("sft.trl_args.output_dir=/tmp/elsewhere")
    with pytest.raises(ConfigError) as err:
        checked("sft.trl_args.seed=1", "sft.trl_args.save_steps=5", "sft.trl_args.eval_strategy=steps")
    assert err.value.problems == [
        "sft.trl_args.seed: set run.seed instead (one name per setting)",
        "sft.trl_args.save_steps: set sft.checkpoint_steps instead (one name per setting)",
        "sft.trl_args.eval_strategy: set sft.early_stopping_patience instead (one name per setting)",
    ]


@pytest.mark.parametrize(
    ("stage", "method"),
    [("sft", None), ("reward", None), *[("align", m) for m in TRL_CONFIGS if m not in ("sft", "reward")]],
)
def test_every_name_tunegate_sets_says_which_name_to_use_instead(stage, method, tmp_path):
    cfg = getattr(PipelineConfig(), stage)
    if method:
        cfg = cfg.model_copy(update={"method": method})
    names = tunegate_kwargs(stage, cfg, output_dir=tmp_path, seed=0, cuda=False)
    unexplained = set(names) - set(type(cfg).model_fields) - set(SET_INSTEAD) - set(OWNED)
    assert not unexplained


def test_wrong_trl_values_are_caught_before_any_stage():
    with pytest.raises(ConfigError, match=r"align.trl_args.num_iterations: 'x' is not a valid value .*int"):
        checked("align.trl_args.num_iterations=x")
    # What GRPOConfig's own checks refuse, found without training anything.
    with pytest.raises(ConfigError, match=r"align: trl.GRPOConfig .*divisible by num_generations \(4\)"):
        checked("align.per_device_train_batch_size=2")
    checked("align.per_device_train_batch_size=2", "run.gpus=2")  # 2 processes x 2 = 4 generations
    with pytest.raises(ConfigError, match=r"sft: trl.SFTConfig .*not a valid SchedulerType"):
        checked("sft.lr_scheduler_type=bogus")


def test_only_the_trainers_a_run_uses_are_checked():
    checked("align.method=dpo", "reward.trl_args.bogus=1")  # dpo trains no reward model
    with pytest.raises(ConfigError, match="align.trl_args.num_generations: not a field of trl.DPOConfig"):
        checked("align.method=dpo", "align.trl_args.num_generations=2")


def test_config_module_imports_neither_trl_nor_the_layers_above():
    code = (
        "import sys, tunegate.config\n"
        "loaded = [m for m in ('trl', 'data_checks', 'tasks', 'flows') if m in sys.modules]\n"
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


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
    assert check_trainer_args(cfg) == []
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


def test_a_benchmark_gate_without_benchmarks_is_a_config_error():
    gate = 'gates=[{"metric": "bench.general_mc.acc", "op": ">=", "baseline": "base", "min_delta": -0.1}]'
    with pytest.raises(ConfigError, match="is decided on a benchmark, and evaluate.benchmarks is empty"):
        load_config(None, [gate])
    bench = 'evaluate.benchmarks=[{"task": "general_mc", "include_path": "data/benchmarks/general_mc"}]'
    assert load_config(None, [gate, bench]).gates[0].metric == "bench.general_mc.acc"


def test_a_judge_metric_without_a_judge_is_a_config_error():
    win = 'gates=[{"metric": "win_rate_vs_base", "op": ">=", "threshold": 0.5}]'
    judge = 'gates=[{"metric": "judge_score", "op": ">=", "baseline": "base"}]'
    for gate in (win, judge):
        with pytest.raises(ConfigError, match="is decided by the judge, and align.method=dpo trains none"):
            load_config(None, [gate, "align.method=dpo"])
        with pytest.raises(ConfigError, match="build.judge_fraction=0 disables it"):
            load_config(None, [gate, "build.judge_fraction=0"])
        assert load_config(None, [gate]).uses_judge  # grpo, judge_fraction 0.3 by default
    # The proxy's own score needs only the proxy; DPO and SFT-only runs stay valid without judge gates.
    assert not load_config(
        None, ['gates=[{"metric": "reward_score", "op": ">=", "baseline": "base"}]', "build.judge_fraction=0"]
    ).uses_judge
    assert not load_config(None, ["align.method=dpo"]).uses_judge
