"""Standard-benchmark forgetting: lm-evaluation-harness tasks scored per row (tasks/benchmarks.py),
offline from a local task definition over local data, inside the evaluate stage and its cache key."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from flows.stages import BY_NAME, stage_key
from tasks.benchmarks import check_benchmarks, definition_files, per_row_values, score_benchmarks
from tasks.evaluate import _load, evaluate_models
from tasks.gates import apply_gates
from tunegate.artifacts import EvalReport, ModelArtifact
from tunegate.config import BenchmarkSpec, GateSpec, load_config, parse_config
from tunegate.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TASK_DIR = ROOT / "data" / "benchmarks" / "general_mc"
ROWS = [json.loads(x) for x in (TASK_DIR / "general_mc.jsonl").read_text().splitlines()]
METRIC = "bench.general_mc.acc"


@pytest.fixture
def in_root(monkeypatch):
    """The demo task's YAML names its data relative to the working directory, as configs do."""
    monkeypatch.chdir(ROOT)


def local_task(where: Path, data: Path | None = None) -> Path:
    """A copy of the demo task under `where`, its YAML naming `data` (default: a copy of the rows
    beside it) by absolute path."""
    where.mkdir(parents=True, exist_ok=True)
    data = data or where / "general_mc.jsonl"
    if not data.exists():
        data.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(TASK_DIR / "general_mc.jsonl", data)
    spec = yaml.safe_load((TASK_DIR / "general_mc.yaml").read_text())
    spec["dataset_kwargs"]["data_files"]["test"] = str(data)
    (where / "general_mc.yaml").write_text(yaml.safe_dump(spec))
    return where


def _picks(model, tokenizer, rows: list[dict]) -> list[float]:
    """Each row scored independently of lm-eval: 1 where the right choice has the highest summed
    log-probability after "Question: ...\\nAnswer:" (the task's prompt and target delimiter)."""
    out = []
    for row in rows:
        context = f"Question: {row['question']}\nAnswer:"
        scores = []
        for choice in row["choices"]:
            ctx = tokenizer(context)["input_ids"]
            whole = tokenizer(context + " " + choice)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
            scores.append(sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole))))
        out.append(float(max(range(len(scores)), key=lambda i: (scores[i], -i)) == row["answer"]))
    return out


def test_the_demo_task_is_scored_row_by_row_in_row_order(tiny_model, in_root):
    model, tokenizer = _load(str(tiny_model), False)
    spec = BenchmarkSpec(task="general_mc", include_path="data/benchmarks/general_mc")
    values, record = score_benchmarks(model, tokenizer, [spec], batch_size=8, seed=1)
    assert set(values) == {METRIC}
    assert values[METRIC] == _picks(model, tokenizer, ROWS)  # lm-eval's acc of each row, in row order
    settings = record["general_mc"]
    assert settings["rows"] == {"general_mc": len(ROWS)} and settings["num_fewshot"] == {"general_mc": 0}
    assert settings["versions"] == {"general_mc": 1.0} and settings["lm_eval"] == "0.4.13"
    assert settings["apply_chat_template"] is False and settings["metrics"] == [METRIC]
    assert len(settings["task_hash"]) == 64
    # `limit`: the first rows, the same ones, so that models compare row by row
    first, limited = score_benchmarks(
        model, tokenizer, [spec.model_copy(update={"limit": 10})], batch_size=8, seed=1
    )
    assert first[METRIC] == values[METRIC][:10] and limited["general_mc"]["rows"] == {"general_mc": 10}
    assert limited["general_mc"]["task_hash"] != settings["task_hash"]


def test_evaluate_models_adds_the_benchmark_to_every_model_with_paired_intervals(
    stage_inputs, tmp_path, in_root
):
    cfg, base, dataset, _ = stage_inputs
    other = _nudged(base, tmp_path / "nudged")
    spec = BenchmarkSpec(task="general_mc", include_path=str(TASK_DIR))
    evaluate = cfg.evaluate.model_copy(update={"benchmarks": [spec]})
    models = {"base": base, "sft": other, "candidate": other, "champion": base}
    report = evaluate_models(evaluate, dataset, models, None, out_dir=tmp_path / "e", seed=1)
    values = json.loads(Path(report.per_row_path).read_text())["values"]
    for label in models:
        assert len(values[label][METRIC]) == len(ROWS) == report.counts[label][METRIC]
        assert report.methods[label][METRIC] == "wilson"
        lo, hi = report.intervals[label][METRIC]
        assert lo < report.scores[label][METRIC] < hi
    assert values["base"][METRIC] == values["champion"][METRIC]  # the same model, the same rows
    assert values["base"][METRIC] != values["candidate"][METRIC]
    for baseline in ("base", "sft", "champion"):
        assert report.delta_methods[baseline][METRIC] == "newcombe-paired"
    assert report.deltas["sft"][METRIC][0] < 0 < report.deltas["sft"][METRIC][1]  # identical: around 0
    assert report.gain_methods["sft"][METRIC] == "newcombe-paired"
    settings = report.benchmarks["general_mc"]
    assert set(settings["task_hashes"]) == set(models) and len(set(settings["task_hashes"].values())) == 1
    assert settings["include_path"] == str(TASK_DIR) and "task_hash" not in settings
    # gated like the canary set: against the base model, with a regression budget
    gate = GateSpec(metric=METRIC, op=">=", baseline="base", min_delta=-0.1)
    result = apply_gates([gate], report).results[0]
    diff = report.scores["candidate"][METRIC] - report.scores["base"][METRIC]
    assert result.value == report.scores["candidate"][METRIC] and result.passed == (diff >= -0.1)
    assert result.method == "newcombe-paired" and result.n == len(ROWS)


def _nudged(base: ModelArtifact, out: Path) -> ModelArtifact:
    """The base model with noise of twice each tensor's spread added: another model, which picks
    otherwise on a few rows (a random model's picks follow the choices' token counts, mostly)."""
    shutil.copytree(base.path, out)
    weights = load_file(out / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    weights = {k: v + 2 * v.std() * torch.randn(v.shape, generator=generator) for k, v in weights.items()}
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return base.model_copy(update={"path": str(out), "role": "align", "digest": "nudged"})


def test_the_evaluate_key_follows_the_task_definition_and_its_data(tmp_path):
    task = local_task(tmp_path / "task")
    context = {
        "dataset": None,
        "models": {},
        "reward": None,
        "judge": None,
        "champion_version": None,
    }

    def keys(include_path: Path) -> dict[str, str]:
        cfg = parse_config(
            {"evaluate": {"benchmarks": [{"task": "general_mc", "include_path": str(include_path)}]}}
        )
        return {
            name: stage_key(BY_NAME[name], cfg, context, "c") for name in ("evaluate", "validate", "align")
        }

    before = keys(task)
    data = task / "general_mc.jsonl"
    data.write_text(data.read_text().replace('"answer": 2', '"answer": 1', 1))
    after = keys(task)
    assert after["evaluate"] != before["evaluate"]  # the rows changed
    assert {k: v for k, v in after.items() if k != "evaluate"} == {
        k: v for k, v in before.items() if k != "evaluate"
    }
    (task / "general_mc.yaml").write_text((task / "general_mc.yaml").read_text().replace("Answer:", "A:"))
    assert keys(task)["evaluate"] != after["evaluate"]  # the prompt changed
    # Data outside the task's directory, named by its YAML, is part of the definition too; a copy of
    # the definition elsewhere, naming the same data, is the same benchmark.
    outside = tmp_path / "shared" / "rows.jsonl"
    first = local_task(tmp_path / "one", data=outside)
    second = local_task(tmp_path / "two", data=outside)
    assert outside in definition_files(first)
    key = keys(first)["evaluate"]
    assert keys(second)["evaluate"] == key
    outside.write_text(outside.read_text() + outside.read_text().splitlines()[0] + "\n")
    assert keys(first)["evaluate"] != key
    # the settings, and the lm-eval version that ships tasks named without a directory, are in it too
    by_name = parse_config({"evaluate": {"benchmarks": [{"task": "arc_easy"}]}})
    fewshot = parse_config({"evaluate": {"benchmarks": [{"task": "arc_easy", "num_fewshot": 5}]}})
    evaluate = BY_NAME["evaluate"]
    assert stage_key(evaluate, by_name, context, "c") != stage_key(evaluate, fewshot, context, "c")


def test_a_task_not_found_is_a_config_error_naming_the_entry_and_the_fix(tmp_path):
    task = local_task(tmp_path / "task")
    typo = BenchmarkSpec(task="general_m", include_path=str(task))
    missing = BenchmarkSpec(task="general_mc", include_path=str(tmp_path / "nowhere"))
    problems = check_benchmarks([typo, missing])
    assert problems[0] == (
        f"evaluate.benchmarks.0.task: 'general_m' is defined by no YAML file in {task}; did you mean 'general_mc'?"
    )
    assert problems[1].startswith(f"evaluate.benchmarks.1.include_path: no directory {tmp_path / 'nowhere'}")
    assert "give the directory holding the task's YAML files" in problems[1] and len(problems) == 2
    other = BenchmarkSpec(task="something_else", include_path=str(task))
    assert "(it defines: general_mc); set `task:` in its YAML" in check_benchmarks([other])[0]
    # refused before any model is scored
    with pytest.raises(ConfigError, match=r"evaluate.benchmarks.0.task: 'general_m' is defined by no YAML"):
        score_benchmarks(None, None, [typo], batch_size=8, seed=1)


def test_evaluation_refuses_a_benchmark_not_found_before_generating(stage_inputs, tmp_path):
    cfg, base, dataset, _ = stage_inputs
    typo = BenchmarkSpec(task="general_m", include_path=str(local_task(tmp_path / "task")))
    evaluate = cfg.evaluate.model_copy(update={"benchmarks": [typo]})
    with pytest.raises(ConfigError, match="did you mean 'general_mc'"):
        evaluate_models(evaluate, dataset, {"base": base}, None, out_dir=tmp_path / "e", seed=1)
    assert not (tmp_path / "e").exists()


def test_a_broken_task_definition_is_named_with_its_file(tmp_path):
    task = local_task(tmp_path / "task", data=tmp_path / "gone.jsonl")
    (tmp_path / "gone.jsonl").unlink()
    (task / "draft.yaml").write_text("task: [unclosed\n")
    problems = check_benchmarks([BenchmarkSpec(task="general_mc", include_path=str(task))])
    assert any(
        p.startswith(f"evaluate.benchmarks.0.include_path: {task / 'draft.yaml'} is not valid YAML")
        for p in problems
    )
    assert any(
        f"{tmp_path / 'gone.jsonl'} is named by a task YAML and does not exist" in p and "fix the path" in p
        for p in problems
    )


def test_tasks_lm_eval_ships_are_found_by_name_without_the_hub():
    assert check_benchmarks([BenchmarkSpec(task="arc_easy")]) == []
    (problem,) = check_benchmarks([BenchmarkSpec(task="arc_easyy")])
    assert problem.startswith(
        "evaluate.benchmarks.0.task: 'arc_easyy' is not a task, group or tag of lm-eval 0.4.13"
    )
    assert "did you mean 'arc_easy'" in problem


def test_per_row_values_by_filter_and_pooled_for_a_group():
    def sample(doc_id: int, acc: float, filter_name: str = "none", **extra) -> dict:
        return {"doc_id": doc_id, "filter": filter_name, "metrics": ["acc", *extra], "acc": acc, **extra}

    samples = {
        "t_b": [sample(1, 0.0), sample(0, 1.0)],
        "t_a": [
            sample(0, 1.0, bleu=("ref", "pred")),
            sample(1, 1.0, bleu=("ref", "x")),
            sample(0, 0.0, "strict"),
        ],
    }
    values = per_row_values("group", samples)
    assert values == {
        "bench.t_a.acc": [1.0, 1.0],
        "bench.t_a.acc.strict": [0.0],
        "bench.t_b.acc": [1.0, 0.0],  # in row order, whatever order lm-eval logged them in
        "bench.group.acc": [1.0, 1.0, 1.0, 0.0],
        "bench.group.acc.strict": [0.0],
    }  # BLEU's per-row values are not numbers: not gated
    assert per_row_values("t_b", {"t_b": samples["t_b"]}) == {"bench.t_b.acc": [1.0, 0.0]}  # no pooling


def test_what_each_benchmark_was_scored_with_reaches_mlflow_params(tmp_path):
    import mlflow

    from flows.reporting import log_report

    settings = {
        "task": "general_mc",
        "limit": None,
        "num_fewshot": {"general_mc": 0},
        "lm_eval": "0.4.13",
        "versions": {"t_a": 1.0, "t_b": 2.0},
        "task_hashes": {"base": "h1", "candidate": "h2"},
    }
    report = EvalReport(
        scores={"candidate": {METRIC: 0.5}},
        n_prompts=0,
        samples_path="-",
        benchmarks={"general_mc": settings},
    )
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        experiment = mlflow.create_experiment("bench", artifact_location=str(tmp_path / "art"))
        with mlflow.start_run(experiment_id=experiment) as run:
            log_report(report)
        params = mlflow.get_run(run.info.run_id).data.params
    finally:
        mlflow.set_tracking_uri(previous)
    assert params["bench.general_mc.num_fewshot"] == "0" and params["bench.general_mc.lm_eval"] == "0.4.13"
    assert params["bench.general_mc.limit"] == "None"
    assert json.loads(params["bench.general_mc.versions"]) == {"t_a": 1.0, "t_b": 2.0}
    assert json.loads(params["bench.general_mc.task_hashes"]) == {"base": "h1", "candidate": "h2"}


def test_benchmark_entries_are_typed_and_the_demo_gates_one():
    with pytest.raises(ConfigError, match=r"evaluate.benchmarks.0.limt: unknown key"):
        parse_config({"evaluate": {"benchmarks": [{"task": "arc_easy", "limt": 5}]}})
    with pytest.raises(
        ConfigError, match=r"evaluate.benchmarks.0.limit: Input should be greater than or equal to 1"
    ):
        parse_config({"evaluate": {"benchmarks": [{"task": "arc_easy", "limit": 0}]}})
    with pytest.raises(ConfigError, match="names arc_easy more than once"):
        parse_config(
            {"evaluate": {"benchmarks": [{"task": "arc_easy"}, {"task": "arc_easy", "num_fewshot": 5}]}}
        )
    demo = load_config(ROOT / "configs" / "demo.yaml")
    assert [b.task for b in demo.evaluate.benchmarks] == ["general_mc"]
    assert any(g.metric == METRIC and g.baseline == "base" for g in demo.gates)
    for field in BenchmarkSpec.model_fields.values():
        assert field.description
