"""The pipeline's stages, declared once: what each runs, the config it reads, the artifacts it takes
and the artifact it makes (Kedro's `node(func, inputs, outputs)`).

The flow walks this table. A stage's call arguments, its cache key and its checkpoint directory all
come from the same declaration, so a key cannot miss an input the stage is given: a stage sees only
the config values and artifacts named here. Notation for `args` and `kwargs`:

    "sft"                  the config section `sft` (a dotted path: "model.system_prompt")
    "@dataset"             the artifact another stage made (or the flow put in the run's context)

A training stage also gets `out_dir`, `checkpoint_dir` (keyed like its cache entry) and `placement`
(where it runs); its key adds the runtime facts that change what training produces: the device kind
and dtype where it runs (or the pool it is sent to). Every key holds the code version, which covers
the stage code and the versions of the libraries it uses (`tunegate.provenance.code_version`).

This module imports no orchestrator: the property test walks it without Prefect.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tunegate.artifacts import Artifact, DataFile, ModelArtifact
from tunegate.config import BenchmarkSpec, DataSection, PipelineConfig


def _always(config: PipelineConfig) -> bool:
    return True


@dataclass(frozen=True)
class Stage:
    name: str  # Prefect task, MLflow run, cache folder
    fn: str  # "module:function", imported when the stage runs
    output: str  # the artifact's name in the run's context
    args: tuple[str, ...] = ()
    kwargs: dict[str, str] = field(default_factory=dict)
    trains: bool = False  # a trainer runs: checkpointed, placed (local or pool), device facts in the key
    cached: bool = True
    when: Callable[[PipelineConfig], bool] = _always
    gates: str | None = None  # the gate stage decided on this stage's metrics (GateSpec.stage)

    def function(self) -> Callable[..., Any]:
        import importlib

        module, _, name = self.fn.partition(":")
        return getattr(importlib.import_module(module), name)

    def refs(self) -> tuple[str, ...]:
        return (*self.args, *self.kwargs.values())

    def config_reads(self, config: PipelineConfig) -> set[str]:
        """The config paths this stage reads, derived values expanded to the fields they come from."""
        out: set[str] = set()
        for ref in self.refs():
            if not ref.startswith("@"):
                out.update(DERIVED.get(ref, (ref,)))
        if self.trains:
            out.add("run.placement")
            if config.run.placement == "pools":
                out.add("run.training_deployment")
        return out


_TRAINING = {"seed": "run.seed", "gpus": "run.gpus", "accelerate_config": "run.accelerate_config"}

# What makes the candidate (PRODUCE), then what decides on it (DECIDE); the flow checks the champion in between.
PRODUCE: tuple[Stage, ...] = (
    Stage("base-model", "tasks.base_model:prepare_base_model", "base", ("model",), cached=False),
    Stage(
        "validate",
        "tasks.validate:validate_data",
        "validated",
        ("validate", "data_needed", "@base"),
        {"system_prompt": "model.system_prompt", "train_on": "sft.train_on"},
    ),
    Stage(
        "build", "tasks.build:build_datasets", "dataset", ("build_needed", "@validated"), {"seed": "run.seed"}
    ),
    Stage(
        "sft",
        "tasks.sft:train_sft",
        "sft",
        ("sft", "@dataset[sft_train,sft_eval]", "@base"),
        _TRAINING,
        trains=True,
        gates="sft",
    ),
    Stage(
        "reward-backbone",
        "tasks.base_model:reward_backbone",
        "backbone",
        ("model", "reward.backbone", "@sft"),
        cached=False,
        when=lambda c: c.uses_reward_model,
    ),
    Stage(
        "reward-model",
        "tasks.reward:train_reward_model",
        "reward",
        ("reward", "@dataset[pref_train,pref_eval]", "@backbone"),
        _TRAINING,
        trains=True,
        when=lambda c: c.uses_reward_model,
        gates="reward",
    ),
    # A second reward model on the disjoint pref_judge pairs, with the proxy's settings and checks. It is
    # never a reward: align gets it only for the reward-hacking guard, evaluation for the win rates.
    Stage(
        "judge-model",
        "tasks.reward:train_judge_model",
        "judge",
        ("reward", "@dataset[pref_judge,pref_eval]", "@backbone"),
        _TRAINING,
        trains=True,
        when=lambda c: c.uses_judge,
    ),
    Stage(
        "align",
        "tasks.align:align_policy",
        "aligned",
        ("align", "@dataset[prompts,pref_train,sft_eval]", "@sft", "@reward", "@judge"),
        # The prompts' checks reward what evaluation scores, with evaluation's brand and refusal settings.
        {**_TRAINING, **{k: f"evaluate.{k}" for k in ("brand_prefix", "brand_suffix", "refusal_markers")}},
        trains=True,
        when=lambda c: c.uses_alignment,
    ),
)
DECIDE: tuple[Stage, ...] = (
    Stage(
        "evaluate",
        "tasks.evaluate:evaluate_models",
        "report",
        ("evaluate", "@dataset[eval,sft_eval]", "@models", "@reward", "@judge"),
        {"seed": "run.seed", "champion_version": "@champion_version"},
    ),
    Stage("gates", "tasks.gates:apply_gates", "verdict", ("gates", "@report"), cached=False),
)

STAGES = PRODUCE + DECIDE
BY_NAME = {s.name: s for s in STAGES}


def waves(stages: tuple[Stage, ...], config: PipelineConfig) -> list[tuple[Stage, ...]]:
    """The stages `config` uses, in table order, grouped into waves that may train at the same time:
    consecutive training stages none of which takes another's output (the reward model and the judge
    both take only the SFT model's backbone and the splits). Every other stage is a wave of its own.
    Derived from the declarations, so a stage that starts reading another's output leaves its wave."""
    out: list[tuple[Stage, ...]] = []
    for stage in (s for s in stages if s.when(config)):
        wave = out[-1] if out else ()
        takes = {ref[1:].partition("[")[0] for ref in stage.refs() if ref.startswith("@")}
        if stage.trains and wave and all(s.trains and s.output not in takes for s in wave):
            out[-1] = (*wave, stage)
        else:
            out.append((stage,))
    return out


# Values the config derives from its fields (properties of PipelineConfig), by the fields they read.
DERIVED: dict[str, tuple[str, ...]] = {
    "data_needed": ("data", "align.method"),
    "build_needed": ("build", "align.method"),
}


def resolve(ref: str, config: PipelineConfig, context: dict[str, Any]) -> Any:
    """A config value by dotted path (sections by their YAML names), an artifact by `@name`, or the
    named splits of the built dataset, `@dataset[sft_train,sft_eval]`: the stage is called with those
    splits only, so its key holds exactly what it reads (new RL prompts do not retrain SFT), and a
    split it reads without declaring it is a KeyError in every run, never a stale cache hit."""
    if ref.startswith("@"):
        name, _, splits = ref[1:].partition("[")
        value = context.get(name)
        if splits and value is not None:
            keep = splits.removesuffix("]").split(",")
            value = value.model_copy(update={"splits": {k: v for k, v in value.splits.items() if k in keep}})
        return value
    value: Any = config
    for part in ref.split("."):
        value = getattr(value, "validate_" if value is config and part == "validate" else part)
    return value


def call_arguments(stage: Stage, config: PipelineConfig, context: dict[str, Any]) -> tuple[list, dict]:
    args = [resolve(r, config, context) for r in stage.args]
    kwargs = {k: resolve(r, config, context) for k, r in stage.kwargs.items()}
    return args, kwargs


def stage_key(stage: Stage, config: PipelineConfig, context: dict[str, Any], code: str) -> str:
    """A digest of everything that decides the stage's result: exactly the values it is called with
    (by content: digests, never paths), the code version and, for training, where it runs."""
    args, kwargs = call_arguments(stage, config, context)
    parts: list[Any] = [stage.name, code, [key_content(a) for a in args], key_content(kwargs)]
    if stage.trains:
        parts.append(training_facts(config))
    payload = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def checkpoint_dir(stage: Stage, key: str, config: PipelineConfig) -> Path:
    """A training stage's checkpoints, keyed like its cache entry: a run started again with the same
    inputs resumes them; a changed input (or GPU count, or device) never does."""
    return Path(config.run.output_dir) / "checkpoints" / f"{stage.name}-{key[:16]}"


def training_facts(config: PipelineConfig) -> dict[str, str]:
    """Where a training stage runs changes what it produces (device, dtype, kernels): part of its key."""
    run = config.run
    if run.placement == "pools":
        return {"placement": f"pool:{run.training_deployment}"}
    return {"placement": "local", **_local_device()}


@cache
def _local_device() -> dict[str, str]:
    import torch

    if torch.cuda.is_available():  # the trainers use bf16 on CUDA, fp32 on CPU (tasks/training.py)
        return {"device": f"cuda:{torch.cuda.get_device_name(0)}", "dtype": "bfloat16"}
    return {"device": "cpu", "dtype": "float32"}


# Fields that say where a record's files are, not what they hold: out of keys, verified on hits.
LOCATION_FIELDS = frozenset(
    {
        "path",
        "root",
        "manifest",
        "report_json",
        "report_markdown",
        "samples_path",
        "per_row_path",
        "llm_judge_path",
    }
)


def key_content(value: Any) -> Any:
    """`value` as JSON-able data by content: a model by its digest, a data file by its sha256, raw data
    by its files' digests, records without their locations."""
    if isinstance(value, ModelArtifact):  # whether its code may run changes what loading it does
        return {"model": value.digest, "trust_remote_code": value.trust_remote_code}
    if isinstance(value, DataFile):
        return {"kind": value.kind, "rows": value.rows, "sha256": value.sha256}
    if isinstance(value, DataSection):
        return data_content(value)
    if isinstance(value, BenchmarkSpec):
        return benchmark_content(value)
    if isinstance(value, Artifact):
        return {
            k: key_content(getattr(value, k))
            for k in type(value).model_fields
            if not is_location(k, getattr(value, k))
        }
    if isinstance(value, BaseModel):  # field by field: a typed value inside a section keeps its rule
        return {
            field.alias or k: key_content(getattr(value, k)) for k, field in type(value).model_fields.items()
        }
    if isinstance(value, dict):
        return {str(k): key_content(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [key_content(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def is_location(key: str, value: Any) -> bool:
    """Whether a record's field says where files are, not what they hold: a location field, or
    ValidatedData's `dropped` (kind -> path of the dropped rows)."""
    if key == "dropped":
        return isinstance(value, dict) and bool(value) and all(isinstance(x, str) for x in value.values())
    return key in LOCATION_FIELDS


def data_content(data: DataSection) -> dict[str, Any]:
    """Raw data by what it holds, kind by kind, wherever the files live: moving them is not new data.
    A Hub dataset pinned to a commit is that commit; an unpinned one (a branch, or none) may have moved
    since the last run, so it never matches a stored key: validation reads it again each run (and the
    stages after it are still reused when what it read is unchanged)."""
    import re
    import time

    from data_checks.readers import HubSource, resolve_sources

    out: dict[str, Any] = {"shapes": dict(sorted(data.shapes.items()))}
    for kind in ("sft", "preferences", "prompts", "eval"):
        spec = getattr(data, kind)
        if spec is None:
            continue
        found = []
        for source in resolve_sources(spec):
            if not isinstance(source, HubSource):
                found.append(file_digest(source))
            elif source.revision and re.fullmatch(r"[0-9a-f]{40}", source.revision):
                found.append(source.label())
            else:
                found.append(f"{source.label()} read at {time.time_ns()}")
        out[kind] = found or f"nothing at {spec}"
    return out


def benchmark_content(spec: BenchmarkSpec) -> dict[str, Any]:
    """A benchmark by what decides its rows and prompts, wherever its files live: its settings, the
    lm-eval version (which ships the tasks named without `include_path`), and for a local definition
    the digest of every file it is made of and reads (YAMLs, code, data; `tasks.benchmarks`)."""
    from importlib.metadata import version

    from tasks.benchmarks import definition_files

    out: dict[str, Any] = {
        **spec.model_dump(mode="json", exclude={"include_path"}),
        "lm_eval": version("lm_eval"),
    }
    if spec.include_path is not None:
        out["definition"] = sorted(  # by content alone: not in the order of where the files are
            file_digest(p) if p.exists() else "nothing there" for p in definition_files(spec.include_path)
        )
    return out


def file_digest(path: Path) -> str:
    """sha256 of a file, or of every file under a directory (a `save_to_disk` dataset)."""
    from tunegate.artifacts import sha256_dir, sha256_file

    return sha256_dir(path) if path.is_dir() else sha256_file(path)
