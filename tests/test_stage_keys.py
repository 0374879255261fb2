"""Stage keys come from the stage table: changing any config field changes the keys of exactly the
stages that read it, and no others (flows/stages.py)."""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel, ValidationError

from flows.stages import STAGES, call_arguments, key_content, stage_key, waves
from tunegate.artifacts import DataFile, EvalReport, InstructionDataset, ModelArtifact, ValidatedData
from tunegate.config import PipelineConfig

# A field whose other values are only valid together with another field's (that no stage reads).
COMPANIONS = {
    "run.placement": {"run.artifact_root": "/shared/artifacts"},
    "registry.format": {"align.save": "adapter"},
}
# Optional sections, off by default: a valid value that turns each on. The "sections" config has them
# all on, so that each of their fields is walked too.
SECTIONS = {"evaluate.llm_judge": {"base_url": "http://127.0.0.1:8000/v1", "model": "judge"}}


def _model(role: str, digest: str) -> ModelArtifact:
    return ModelArtifact(path=f"/models/{digest}", role=role, base_model="m", digest=digest)


def _context() -> dict[str, Any]:
    files = {k: DataFile(kind=k, path=f"/v/{k}.jsonl", rows=3, sha256=k * 4) for k in ("sft", "eval")}
    splits = {
        k: DataFile(kind=k, path=f"/d/{k}.parquet", rows=3, sha256=k * 2)
        for k in ("sft_train", "sft_eval", "pref_train", "pref_judge", "pref_eval", "prompts", "eval")
    }
    return {
        "base": _model("base", "b0"),
        "validated": ValidatedData(files=files, report_json="/v/r.json", report_markdown="/v/r.md"),
        "dataset": InstructionDataset(root="/d", splits=splits, manifest="/d/manifest.json"),
        "sft": _model("sft", "s0"),
        "backbone": _model("sft", "s0"),
        "reward": _model("reward", "r0"),
        "judge": _model("judge", "j0"),
        "models": {"base": _model("base", "b0"), "candidate": _model("align", "a0")},
        "report": EvalReport(scores={"candidate": {"x": 1.0}}, n_prompts=3, samples_path="/e/s.jsonl"),
        "champion_version": "1",
    }


@pytest.fixture(params=["local", "pools", "sections"])
def config(tmp_path, request) -> PipelineConfig:
    run = {
        "placement": "pools" if request.param == "pools" else "local",
        "artifact_root": "/shared/artifacts",
    }
    data = {}
    for kind in ("sft", "preferences", "prompts", "eval"):
        (tmp_path / f"{kind}.jsonl").write_text(json.dumps({"kind": kind}) + "\n")
        data[kind] = str(tmp_path / f"{kind}.jsonl")
    raw: dict[str, Any] = {"run": run, "data": data}
    if request.param == "sections":
        for path, value in SECTIONS.items():
            section, name = path.split(".")
            raw.setdefault(section, {})[name] = value
    return PipelineConfig.model_validate(raw)


def _leaves(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{field.alias or name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _leaves(ann, f"{path}.")
        elif (section := _optional_section(ann)) is not None:  # on or off, then each of its fields
            out += [path, *_leaves(section, f"{path}.")]
        else:
            out.append(path)
    return out


def _optional_section(annotation: Any) -> type[BaseModel] | None:
    """`X` for a field typed `X | None` where X is a config section."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    optional = len(args) == 1 and len(typing.get_args(annotation)) == 2
    if optional and isinstance(args[0], type) and issubclass(args[0], BaseModel):
        return args[0]
    return None


def _candidates(value: Any, annotation: Any) -> list[Any]:
    """Other values a field might take, in order of preference; the first that validates is used."""
    literals = [a for a in _flatten(annotation) if typing.get_origin(a) is Literal]
    options = [v for lit in literals for v in typing.get_args(lit) if v != value]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [*options, value + 1, value - 1]
    if isinstance(value, float):
        return [*options, value * 0.5 or 0.1, value + 0.01, value * 2]
    if isinstance(value, str):
        return [*options, f"{value}x", ["x"]]
    if value is None:
        return [*options, "x", 1, 0.5, True, ["x"]]
    if isinstance(value, list):
        entry = _entry(annotation)  # a list of typed entries (evaluate.benchmarks): one entry more
        return [
            value[:-1] if value else ["x"],
            [*value, "q_proj"],
            ["x"],
            *([[*value, entry]] if entry else []),
        ]
    if isinstance(value, dict):
        changed = {k: (v + 1 if isinstance(v, int) else v) for k, v in value.items()}
        return [changed if value else {"sft": "alpaca"}, {"max_grad_norm": 0.5}, {"X": "y"}]
    raise AssertionError(f"no candidates for {value!r}")


def _entry(annotation: Any) -> dict[str, str] | None:
    """For a field typed `list[X]`, X a config model: an X with each required field set to "x"."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is list and args and isinstance(args[0], type):
        if issubclass(args[0], BaseModel):
            return {name: "x" for name, f in args[0].model_fields.items() if f.is_required()}
    return None


def _flatten(annotation: Any) -> list[Any]:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Literal or not args:
        return [annotation]
    return [a for arg in args for a in _flatten(arg)]


def _get(raw: dict, path: str) -> Any:
    for part in path.split("."):
        raw = raw[part]
    return raw


def _present(raw: dict, path: str) -> bool:
    """Whether the section holding `path` is there (not an optional section that is off)."""
    *parents, _ = path.split(".")
    return all(_get(raw, ".".join(parents[: i + 1])) is not None for i in range(len(parents)))


def _set(raw: dict, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for part in parents:
        raw = raw[part]
    raw[last] = value


def _annotation(path: str) -> Any:
    model: Any = PipelineConfig
    for part in path.split("."):
        field = next(f for n, f in model.model_fields.items() if (f.alias or n) == part)
        model = _optional_section(field.annotation) or field.annotation
    return model


def _mutations(config: PipelineConfig, path: str) -> list[PipelineConfig]:
    """Every valid config that differs from `config` in `path` (and its companions) by one candidate."""
    raw = config.model_dump(mode="json", by_alias=True)
    out = []
    value = _get(raw, path)
    if path in SECTIONS:
        candidates = [SECTIONS[path]] if value is None else [None]
    else:
        candidates = _candidates(value, _annotation(path))
    for candidate in candidates:
        trial = json.loads(json.dumps(raw))
        _set(trial, path, candidate)
        for other, value in COMPANIONS.get(path, {}).items():
            _set(trial, other, value)
        try:
            out.append(PipelineConfig.model_validate(trial))
        except ValidationError:
            continue
    assert out, f"no valid other value found for {path}: add it to COMPANIONS"
    return out


def _keys(config: PipelineConfig) -> dict[str, str]:
    ctx = _context()
    return {s.name: stage_key(s, config, ctx, code="c") for s in STAGES}


def _reads(stage, config: PipelineConfig, path: str) -> bool:
    reads = stage.config_reads(config)
    return any(path == r or path.startswith(f"{r}.") or r.startswith(f"{path}.") for r in reads)


def test_every_config_field_changes_exactly_the_keys_of_the_stages_that_read_it(config):
    """Each other value of a field changes only the keys of stages that read it (nothing spurious),
    and every stage that reads it changes key for some value (nothing missed)."""
    before = _keys(config)
    wrong = []
    raw = config.model_dump(mode="json", by_alias=True)
    for path in _leaves(PipelineConfig):
        if not _present(raw, path):  # a field of an optional section that is off: see the "sections" config
            continue
        touched = [path, *COMPANIONS.get(path, {})]
        expected = {s.name for s in STAGES if any(_reads(s, config, p) for p in touched)}
        seen: set[str] = set()
        for other in _mutations(config, path):
            after = _keys(other)
            changed = {name for name in before if before[name] != after[name]}
            if spurious := changed - expected:
                wrong.append(f"{path}: also changed the keys of {sorted(spurious)}, which do not read it")
            seen |= changed
        if missed := expected - seen:
            wrong.append(f"{path}: read by {sorted(missed)}, whose keys never changed with it")
    assert not wrong, "\n".join(wrong)


def test_a_stage_is_called_with_exactly_what_its_key_holds(config):
    """The key and the call come from one declaration: every argument is in the key's content."""
    ctx = _context()
    for stage in STAGES:
        args, kwargs = call_arguments(stage, config, ctx)
        assert len(args) == len(stage.args) and set(kwargs) == set(stage.kwargs)


def test_keys_follow_content_not_locations(config, tmp_path):
    ctx = _context()
    moved = dict(ctx, sft=ctx["sft"].model_copy(update={"path": "/elsewhere"}))
    retrained = dict(ctx, sft=ctx["sft"].model_copy(update={"digest": "s1"}))
    align = next(s for s in STAGES if s.name == "align")
    key = stage_key(align, config, ctx, "c")
    assert stage_key(align, config, moved, "c") == key  # same weights, another directory
    assert stage_key(align, config, retrained, "c") != key  # other weights
    assert stage_key(align, config, ctx, "other code") != key
    # Raw data keyed by what the files hold: a copy elsewhere is the same data, an edit is not.
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "sft.jsonl").write_bytes(Path(config.data.sft).read_bytes())
    validate = next(s for s in STAGES if s.name == "validate")
    key = stage_key(validate, config, ctx, "c")
    elsewhere = config.model_copy(
        update={"data": config.data.model_copy(update={"sft": str(copy / "sft.jsonl")})}
    )
    assert stage_key(validate, elsewhere, ctx, "c") == key
    (copy / "sft.jsonl").write_text('{"kind": "changed"}\n')
    assert stage_key(validate, elsewhere, ctx, "c") != key


def test_a_split_changes_only_the_keys_of_the_stages_that_read_it(config):
    """Each training or evaluation stage declares the splits it reads (`@dataset[...]`), is called with
    those alone, and is keyed by those alone: new RL prompts retrain neither SFT nor the reward models."""
    ctx = _context()
    readers = {
        "sft_train": {"sft"},
        "sft_eval": {"sft", "align", "evaluate"},
        "pref_train": {"reward-model", "align"},  # align: DPO trains on the pairs
        "pref_judge": {"judge-model"},
        "pref_eval": {"reward-model", "judge-model"},
        "prompts": {"align"},
        "eval": {"evaluate"},
    }
    for split, expected in readers.items():
        dataset = ctx["dataset"]
        changed_split = dataset.splits[split].model_copy(update={"sha256": "new"})
        other = dict(
            ctx, dataset=dataset.model_copy(update={"splits": {**dataset.splits, split: changed_split}})
        )
        changed = {
            s.name
            for s in STAGES
            if s.name not in ("validate", "build")
            and stage_key(s, config, ctx, "c") != stage_key(s, config, other, "c")
        }
        assert changed == expected, split
    sft = next(s for s in STAGES if s.name == "sft")
    args, _ = call_arguments(sft, config, ctx)
    dataset = next(a for a in args if isinstance(a, InstructionDataset))
    assert set(dataset.splits) == {"sft_train", "sft_eval"}  # reading "prompts" there is a KeyError


def test_the_judge_reaches_only_the_guard_and_evaluation(config):
    """Another judge changes the keys of align (its guard) and evaluate, never the proxy reward model's;
    the judge trains only when online RL runs with build.judge_fraction above 0."""
    ctx = _context()
    other = dict(ctx, judge=ctx["judge"].model_copy(update={"digest": "j1"}))
    changed = {s.name for s in STAGES if stage_key(s, config, ctx, "c") != stage_key(s, config, other, "c")}
    assert changed == {"align", "evaluate"}
    judge = next(s for s in STAGES if s.name == "judge-model")
    assert judge.when(config) and "reward-model" in [s.name for s in STAGES if s.when(config)]
    off = config.model_copy(update={"build": config.build.model_copy(update={"judge_fraction": 0.0})})
    assert not judge.when(off) and off.build_needed.judge_fraction == 0.0
    dpo = config.model_copy(update={"align": config.align.model_copy(update={"method": "dpo"})})
    assert not judge.when(dpo) and dpo.build_needed.judge_fraction == 0.0  # DPO keeps every pair


def test_a_run_reads_only_the_data_its_stages_need(config):
    sft_only = config.model_copy(update={"align": config.align.model_copy(update={"method": "none"})})
    assert sft_only.data_kinds == ("sft", "eval")
    assert sft_only.data_needed.preferences is None and sft_only.data_needed.prompts is None
    assert [s.name for s in STAGES if s.when(sft_only)] == [
        "base-model",
        "validate",
        "build",
        "sft",
        "evaluate",
        "gates",
    ]
    dpo = config.model_copy(update={"align": config.align.model_copy(update={"method": "dpo"})})
    assert dpo.data_kinds == ("sft", "preferences", "eval")
    assert "reward-model" not in [s.name for s in STAGES if s.when(dpo)]
    # An SFT-only run needs no preference or prompt files at all.
    cfg = PipelineConfig.model_validate(
        {"align": {"method": "none"}, "data": {"preferences": None, "prompts": None}}
    )
    assert key_content(cfg.data_needed)["shapes"] == {}
    with pytest.raises(ValidationError, match="data.preferences: align.method=grpo needs it"):
        PipelineConfig.model_validate({"data": {"preferences": None}})


def test_waves_train_side_by_side_only_stages_that_take_nothing_from_each_other(config):
    """`run.parallel_stages` trains a wave's stages at once: the waves come from the declarations, in
    table order, each stage once, and no stage of a wave takes the output of another."""
    methods = {"grpo": [("reward-model", "judge-model")], "dpo": [], "none": []}
    for method, together in methods.items():
        cfg = config.model_copy(update={"align": config.align.model_copy(update={"method": method})})
        grouped = waves(STAGES, cfg)
        assert [s for wave in grouped for s in wave] == [s for s in STAGES if s.when(cfg)]
        assert [tuple(s.name for s in w) for w in grouped if len(w) > 1] == together, method
        for wave in grouped:
            outputs = {s.output for s in wave}
            assert len(wave) == 1 or all(s.trains for s in wave)
            for stage in wave:
                takes = {r[1:].partition("[")[0] for r in stage.refs() if r.startswith("@")}
                assert not takes & outputs, f"{stage.name} takes {takes & outputs} from its own wave"


def test_a_stage_that_reads_another_leaves_its_wave(config):
    """Were the judge to take the proxy reward model (a judge trained to agree with it), it would train
    after it, not beside it: the waves follow the table, not a list kept by hand."""
    from dataclasses import replace

    judge = next(s for s in STAGES if s.name == "judge-model")
    table = tuple(replace(s, args=(*s.args, "@reward")) if s is judge else s for s in STAGES)
    assert all(len(wave) == 1 for wave in waves(table, config))
