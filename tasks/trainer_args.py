"""Each training stage's TRL config object, built in one place from the stage's section.

Every TRL setting has exactly one name, as with TRL's own `TrlParser`:
- a field tunegate lifts into the section under TRL's name (`sft.learning_rate`, `align.beta`);
- a setting tunegate decides itself (`output_dir`, keyed by content so a run can resume), or derives
  from a section field of its own (`save_steps` from `sft.checkpoint_steps`);
- any further field of the TRL class, under `trl_args` (`sft.trl_args.weight_decay`).
A name under `trl_args` that is one of the first two kinds is refused, naming the one to use; a name
the class lacks is refused with the nearest valid one; a value of the wrong type is refused with the
type TRL declares. (A few defaults tunegate picks, `DEFAULTS`, stay changeable under `trl_args`:
nothing in tunegate depends on them, and they have no other name.) `check_trainer_args` builds every config object a run will use before any stage
starts, so a bad setting fails the run in seconds instead of after SFT has trained.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import tempfile
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.training import on_cuda
from tunegate.config import AlignSection, PipelineConfig, RewardSection, SftSection, TrainSection
from tunegate.errors import ConfigError


def _sft(cfg: SftSection) -> dict[str, Any]:
    early = cfg.early_stopping_patience is not None
    kwargs = {
        "max_length": cfg.max_length,
        "packing": cfg.packing,
        # Early stopping (the callback is added by the stage) restores the best model from its
        # checkpoint, so evaluation and saving share one cadence. Always set, so that these names
        # belong to `sft.early_stopping_patience` whether it is on or off.
        "eval_strategy": "steps" if early else "no",
        "eval_steps": cfg.eval_steps,
        "load_best_model_at_end": early,
        "metric_for_best_model": "eval_loss" if early else None,
        "greater_is_better": False if early else None,
        # tunegate tokenises with its own loss mask (`sft.train_on`, tasks/sft.py): TRL's masks stay off.
        "assistant_only_loss": False,
        "completion_only_loss": False,
    }
    if early:
        kwargs.update(save_strategy="steps", save_steps=cfg.eval_steps)
    return kwargs


def _reward(cfg: RewardSection) -> dict[str, Any]:
    return {"max_length": cfg.max_length}


def _online(cfg: AlignSection) -> dict[str, Any]:
    return {
        "beta": cfg.beta,
        "num_generations": cfg.num_generations,
        "max_completion_length": cfg.max_completion_length,
        "temperature": cfg.temperature,
    }


def _offline(cfg: AlignSection) -> dict[str, Any]:
    return {"beta": cfg.beta, "max_length": cfg.max_length}


# Stage, or alignment method -> (TRL config class, the stage's own arguments). An alignment method
# joins with one line here, e.g. "kto": ("KTOConfig", _offline).
TRL_CONFIGS: dict[str, tuple[str, Callable[[Any], dict[str, Any]]]] = {
    "sft": ("SFTConfig", _sft),
    "reward": ("RewardConfig", _reward),
    "grpo": ("GRPOConfig", _online),
    "rloo": ("RLOOConfig", _online),
    "dpo": ("DPOConfig", _offline),
}

# Settings tunegate chooses but `trl_args` may change (nothing else in tunegate depends on them).
DEFAULTS: dict[str, Any] = {
    # Recomputing activations saves memory a 135M model on CPU does not need, at ~25% more time.
    "gradient_checkpointing": False,
    "disable_tqdm": True,
    "dataloader_num_workers": 0,
}

# Why a setting tunegate decides itself is not a `trl_args` name: the config name that decides it
# ("set X instead"), or the reason tunegate owns it. Every name the builders set that is not a
# section field has an entry (tests/test_config.py checks it).
SET_INSTEAD: dict[str, str] = {
    "seed": "run.seed",
    "data_seed": "run.seed",
    "save_strategy": "{section}.checkpoint_steps",
    "save_steps": "{section}.checkpoint_steps",
    "eval_strategy": "sft.early_stopping_patience",
    "load_best_model_at_end": "sft.early_stopping_patience",
    "metric_for_best_model": "sft.early_stopping_patience",
    "greater_is_better": "sft.early_stopping_patience",
    "assistant_only_loss": "sft.train_on",
    "completion_only_loss": "sft.train_on",
}
OWNED: dict[str, str] = {
    "output_dir": "it is keyed by content so a run can resume from its checkpoints",
    "report_to": "the trainers log to the stage's MLflow run",
    "use_cpu": "the device is CUDA when present, else the CPU",
    "bf16": "the dtype follows the device (bf16 on CUDA, fp32 on CPU), as the model is loaded",
    "save_total_limit": "two checkpoints are kept so that a corrupted one falls back to the one before",
    "logging_nan_inf_filter": "the guard that stops training on a NaN or infinite loss must see every loss",
}


def trl_class_name(stage: str, cfg: TrainSection) -> str:
    """The TRL config class `stage` ("sft", "reward" or "align") builds, e.g. "GRPOConfig"."""
    return TRL_CONFIGS[_kind(stage, cfg)][0]


def tunegate_kwargs(
    stage: str, cfg: TrainSection, *, output_dir: Path, seed: int, cuda: bool
) -> dict[str, Any]:
    """Every TRL argument tunegate sets for `stage`: the common ones, then the stage's own. These are
    the names `trl_args` may not repeat."""
    import mlflow

    common = {
        "output_dir": str(output_dir),
        "max_steps": cfg.max_steps,
        "learning_rate": cfg.learning_rate,
        "per_device_train_batch_size": cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "warmup_steps": cfg.warmup_steps,
        "lr_scheduler_type": cfg.lr_scheduler_type,
        "logging_steps": cfg.logging_steps,
        "seed": seed,
        "data_seed": seed,
        "bf16": cuda,
        "use_cpu": not cuda,
        "save_strategy": "steps" if cfg.checkpoint_steps else "no",
        "save_steps": cfg.checkpoint_steps or 500,
        "save_total_limit": 2,
        # The default filter hides NaN/inf losses from the logs; the guard must see them.
        "logging_nan_inf_filter": False,
        # Under `accelerate launch` the stage's run comes from MLFLOW_RUN_ID (see tasks/launch.py).
        "report_to": ["mlflow"] if mlflow.active_run() is not None or os.environ.get("MLFLOW_RUN_ID") else [],
    }
    return {**common, **TRL_CONFIGS[_kind(stage, cfg)][1](cfg)}


def trainer_config(
    stage: str,
    cfg: TrainSection,
    *,
    output_dir: Path,
    seed: int,
    cuda: bool | None = None,
    world_size: int = 1,
):
    """The TRL config object for `stage` ("sft", "reward" or "align"), built from its section.

    Args:
        stage: the section's name, used in messages.
        cfg: the stage's section; `trl_args` come last, after tunegate's own settings.
        output_dir: where the trainer writes checkpoints.
        seed: the run's seed (also the data seed).
        cuda: train on CUDA in bf16; default: whether CUDA is present.
        world_size: processes the stage will train in. Only for checking: TRL derives some settings
            from it (GRPO's generation batch), and a real run takes it from `accelerate launch`.

    Returns:
        An `SFTConfig`, `RewardConfig`, or the alignment method's config (`GRPOConfig`, ...).

    Raises:
        ConfigError: a `trl_args` name that tunegate sets or declares, or that the class lacks; a
            value of the wrong type; a combination the class refuses.
    """
    import trl

    name = trl_class_name(stage, cfg)
    cls = getattr(trl, name)
    kwargs = tunegate_kwargs(
        stage, cfg, output_dir=output_dir, seed=seed, cuda=on_cuda() if cuda is None else cuda
    )
    passed, problems = _check_trl_args(stage, cfg, cls, kwargs)
    if problems:
        raise ConfigError(problems)
    if world_size > 1:
        cls = type(name, (cls,), {"world_size": property(lambda self: world_size)})
    try:
        return cls(**{**DEFAULTS, **kwargs, **passed})
    except (TypeError, ValueError) as exc:
        raise ConfigError([f"{stage}: trl.{name} refuses these settings: {exc}"]) from exc


def check_trainer_args(config: PipelineConfig) -> list[str]:
    """Build every TRL config object the run will use, as its stages will (on the CPU, in a throwaway
    directory), and return every problem found; empty when all are fine.

    SFT always; the reward model when the run trains one; the alignment method's class unless
    `align.method` is "none". What is found: `trl_args` names that tunegate sets or declares, or
    that the TRL class lacks; values of the wrong type; and what the class's own checks refuse
    (e.g. GRPO's generation batch not divisible by `num_generations`), each with its section named.
    """
    stages: list[tuple[str, TrainSection]] = [("sft", config.sft)]
    if config.uses_reward_model:
        stages.append(("reward", config.reward))
    if config.uses_alignment:
        stages.append(("align", config.align))
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="tunegate-check-") as tmp:
        for stage, cfg in stages:
            if _kind(stage, cfg) not in TRL_CONFIGS:
                problems.append(f"align.method={cfg.method}: no TRL config class is known for it")
                continue
            try:
                trainer_config(
                    stage,
                    cfg,
                    output_dir=Path(tmp) / stage,
                    seed=config.run.seed,
                    cuda=False,
                    world_size=config.run.gpus,
                )
            except ConfigError as exc:
                problems += exc.problems
    return problems


def _kind(stage: str, cfg: TrainSection) -> str:
    return cfg.method if stage == "align" else stage


def _check_trl_args(
    stage: str, cfg: TrainSection, cls: type, kwargs: dict[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """`cfg.trl_args`, each value as the type TRL declares it, and every problem with them."""
    from pydantic import TypeAdapter, ValidationError

    types = _field_types(cls)
    lifted = set(type(cfg).model_fields) - {"trl_args"}
    passed: dict[str, Any] = {}
    problems = []
    for key, value in cfg.trl_args.items():
        where = f"{stage}.trl_args.{key}"
        if key in lifted and (key in types or key in kwargs):
            problems.append(f"{where}: set {stage}.{key} instead (one name per setting)")
        elif key in kwargs:
            problems.append(f"{where}: {_owned_because(stage, key)}")
        elif key not in types:
            near = difflib.get_close_matches(key, types, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            problems.append(f"{where}: not a field of trl.{cls.__name__}{hint}")
        else:
            try:
                passed[key] = TypeAdapter(types[key]).validate_python(value)
            except ValidationError as exc:
                why = exc.errors()[0]["msg"]
                problems.append(
                    f"{where}: {value!r} is not a valid value for trl.{cls.__name__}.{key} "
                    f"(declared {_type_name(types[key])}: {why})"
                )
    return passed, problems


def _owned_because(stage: str, key: str) -> str:
    if key in SET_INSTEAD:
        return f"set {SET_INSTEAD[key].format(section=stage)} instead (one name per setting)"
    return f"{key} is tunegate's: {OWNED.get(key, 'tunegate sets it')}; remove it"


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")
