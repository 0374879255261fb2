"""The pipeline flow end to end on the tiny model, under a real (temporary) Prefect API and MLflow store."""

from __future__ import annotations

import json
import time

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from flows.cli import main
from flows.pipeline import pipeline
from tasks.scoring import wins
from tests.conftest import tiny_raw_config
from tunegate.config import parse_config
from tunegate.errors import ConfigError, DataValidationError, StageGateFailed

# Whole pipeline runs, real servers or subprocess drills: not in `make test-fast`.
pytestmark = pytest.mark.integration


def _aliases(client: MlflowClient) -> dict[str, str]:
    return {k: str(v) for k, v in client.get_registered_model("tiny-assistant").aliases.items()}


def _client(cfg) -> MlflowClient:
    return MlflowClient(tracking_uri=cfg.registry.tracking_uri, registry_uri=cfg.registry.tracking_uri)


def test_pipeline_registers_promotes_and_logs_lineage(prefect_api, tiny_model, data_dir, tmp_path):
    cfg = parse_config(tiny_raw_config(tiny_model, data_dir, tmp_path))
    result = pipeline(cfg)

    reg = result["registration"]
    assert result["verdict"]["passed"] and reg["promoted"] and reg["version"] == "1"
    client = _client(cfg)
    champion = client.get_model_version_by_alias("tiny-assistant", "champion")
    assert str(champion.version) == "1"

    parent = client.get_run(result["mlflow_run_id"])
    assert parent.data.tags["prefect.flow_run_id"] == result["flow_run_id"]
    assert parent.data.tags["tunegate.config_digest"] == cfg.digest()
    assert parent.data.tags["tunegate.promoted"] == "true"
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    stages = {r.data.tags["tunegate.stage"] for r in children}
    assert stages == {
        "base-model",
        "validate",
        "build",
        "sft",
        "reward-backbone",
        "reward-model",
        "judge-model",
        "align",
        "evaluate",
        "gates",
        "register",
    }
    sft_run = next(r for r in children if r.data.tags["tunegate.stage"] == "sft")
    assert "train_loss" in sft_run.data.metrics or "loss" in sft_run.data.metrics
    align_run = next(r for r in children if r.data.tags["tunegate.stage"] == "align")
    for key in ("reward", "kl", "completions/mean_length", "entropy"):  # per step (logging_steps=1)
        assert [m.step for m in client.get_metric_history(align_run.info.run_id, key)] == [1, 2], key

    inputs = {d.dataset.name: d for d in parent.inputs.dataset_inputs}
    assert {"sft_train", "sft_eval", "pref_train", "prompts", "eval"} <= set(inputs)
    train = inputs["sft_train"]
    tags = {t.key: t.value for t in train.tags}
    assert train.dataset.digest == tags["sha256"][:16] and int(tags["rows"]) > 0
    assert '"name": "prompt"' in train.dataset.schema and 'sft_train.parquet"' in train.dataset.source
    data_files = {a.path for a in client.list_artifacts(parent.info.run_id, "data")}
    assert {"data/manifest.json", "data/dropped.jsonl", "data/sources.json"} <= data_files
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"gates.md", "gates.json", "gates.png", "config", "data", "validation", "evaluation"} <= artifacts
    evaluation = {a.path for a in client.list_artifacts(parent.info.run_id, "evaluation")}
    assert evaluation == {"evaluation/samples.jsonl", "evaluation/per_row.json"}
    report = result["report"]
    assert set(report["scores"]) == {"base", "sft", "candidate"}  # every stage's model on the same rows
    assert set(report["gains"]) == {"sft", "alignment"} and "eval_loss" in report["gains"]["sft"]
    assert "What each stage added" in result["verdict"]["markdown"]
    scores = result["report"]["scores"]["candidate"]
    # The win rate is the judge's verdict row by row (ties half), recomputed here from its scores.
    per_row = json.loads(open(report["per_row_path"]).read())["values"]
    judged = wins(per_row["candidate"]["judge_score"], per_row["base"]["judge_score"])
    assert scores["win_rate_vs_base"] == pytest.approx(sum(judged) / len(judged))
    assert "win_rate_vs_base" in result["report"]["intervals"]["candidate"]
    assert "candidate.fact_accuracy.ci_low" in parent.data.metrics
    gain = report["gains"]["alignment"]["eval_loss"]  # what alignment added, as MLflow metrics too
    assert [parent.data.metrics[f"gain.alignment.eval_loss{end}"] for end in ("", ".ci_low", ".ci_high")] == (
        pytest.approx(gain)
    )
    resolved = json.loads(
        open(
            mlflow.artifacts.download_artifacts(
                run_id=parent.info.run_id,
                artifact_path="config/resolved.json",
                tracking_uri=cfg.registry.tracking_uri,
            )
        ).read()
    )
    assert resolved["sft"]["max_steps"] == 2

    # A second run (another seed: new weights) compares against the first run's champion and, passing,
    # takes over.
    raw = tiny_raw_config(tiny_model, data_dir, tmp_path)
    again = pipeline(parse_config({**raw, "run": {**raw["run"], "seed": 7}}))
    assert set(again["report"]["scores"]) == {"base", "sft", "candidate", "champion"}
    assert again["registration"]["version"] == "2"
    assert str(client.get_model_version_by_alias("tiny-assistant", "champion").version) == "2"
    assert str(client.get_model_version_by_alias("tiny-assistant", "previous").version) == "1"

    # A failing gate ends the run completed-but-not-promoted, with the champion untouched. (This run's
    # reward model starts from a backbone named in the config, here the base model, not the SFT model.)
    raw = tiny_raw_config(tiny_model, data_dir, tmp_path)
    raw["reward"]["backbone"] = str(tiny_model)
    strict = parse_config({**raw, "gates": [{"metric": "fact_accuracy", "op": ">=", "threshold": 0.99}]})
    rejected = pipeline(strict)
    stage_runs = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{rejected['mlflow_run_id']}'"
    )
    stage_names = [r.data.tags["tunegate.stage"] for r in stage_runs]
    assert stage_names.count("base-model") == 1 and stage_names.count("reward-backbone") == 1
    assert not rejected["verdict"]["passed"]
    assert not rejected["registration"]["promoted"] and rejected["registration"]["version"] is None
    assert "fact_accuracy >= 0.99" in rejected["registration"]["reason"]
    assert str(client.get_model_version_by_alias("tiny-assistant", "champion").version) == "2"
    assert len(client.search_model_versions("name='tiny-assistant'")) == 2
    # ... but its model is kept, logged in the register stage's run, for audit.
    register_run = next(r for r in stage_runs if r.data.tags["tunegate.stage"] == "register")
    assert register_run.data.tags["tunegate.audit_model_uri"].startswith("models:/")
    assert "logged for audit" in rejected["registration"]["reason"]
    audit = mlflow.search_logged_models(
        experiment_ids=[parent.info.experiment_id],
        filter_string=f"source_run_id = '{register_run.info.run_id}'",
        output_format="list",
    )
    assert len(audit) == 1

    # The challenger alias only lives during promotion; rollback puts `previous` back, and back again.
    assert _aliases(client) == {"champion": "2", "previous": "1"}
    uri = f"registry.tracking_uri={cfg.registry.tracking_uri}"
    assert main(["rollback", "tiny-assistant", uri]) == 0
    assert _aliases(client) == {"champion": "1", "previous": "2"}
    assert client.get_model_version("tiny-assistant", "2").tags["tunegate.rolled_back"] == "true"
    assert main(["rollback", "tiny-assistant", uri]) == 0
    assert _aliases(client) == {"champion": "2", "previous": "1"}
    assert main(["rollback", "no-such-model", uri]) == 1


def test_bad_data_stops_before_training_naming_the_row(prefect_api, tiny_model, data_dir, tmp_path):
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    for kind in ("preferences", "prompts", "eval"):
        (bad_dir / f"{kind}.jsonl").write_text((data_dir / f"{kind}.jsonl").read_text())
    lines = (data_dir / "sft.jsonl").read_text().splitlines()
    lines[6] = lines[6].replace('"assistant"', '"robot"')
    (bad_dir / "sft.jsonl").write_text("\n".join(lines) + "\n")
    raw = tiny_raw_config(tiny_model, bad_dir, tmp_path)
    cfg = parse_config(raw)
    with pytest.raises(DataValidationError, match=r"sft\.jsonl:7.*allowed roles"):
        pipeline(cfg)
    client = _client(cfg)
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    stages = {r.data.tags.get("tunegate.stage") for r in runs}
    assert "sft" not in stages and "validate" in stages
    assert all(
        r.info.status == "FAILED" for r in runs if r.data.tags.get("tunegate.stage") in (None, "validate")
    )
    assert not client.search_registered_models()


def test_a_failing_data_gate_stops_the_run_before_training(prefect_api, tiny_model, data_dir, tmp_path):
    raw = tiny_raw_config(tiny_model, data_dir, tmp_path)
    raw["gates"] = [
        {"metric": "sft.dropped_fraction", "op": "<=", "threshold": 0.5, "stage": "data"},
        {"metric": "sft_train.rows", "op": ">=", "threshold": 1_000_000, "stage": "data"},
    ]
    cfg = parse_config(raw)
    with pytest.raises(StageGateFailed, match=r"gates after data failed \(\[data\] sft_train.rows >= 1e\+06"):
        pipeline(cfg)
    client = _client(cfg)
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    stages = {r.data.tags.get("tunegate.stage") for r in runs}
    assert "build" in stages and "sft" not in stages
    parent = next(r for r in runs if "tunegate.stage" not in r.data.tags)
    assert {"gates-data.md", "gates-data.json", "gates-data.png"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)
    }
    assert not client.search_registered_models()


def test_placement_pools_without_its_training_deployment_stops_before_anything_runs(
    prefect_api, tiny_model, data_dir, tmp_path
):
    raw = tiny_raw_config(tiny_model, data_dir, tmp_path)
    raw["run"].update(placement="pools", artifact_root=str(tmp_path / "shared"))
    cfg = parse_config(raw)
    with pytest.raises(
        ConfigError, match=r"tunegate-train-stage/train' is not on the Prefect server.*tunegate deploy"
    ):
        pipeline(cfg)
    client = _client(cfg)
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert not {r.data.tags.get("tunegate.stage") for r in runs} - {None}  # no stage started
    assert not (tmp_path / "shared").exists() and not client.search_registered_models()


def _stage_runs(client: MlflowClient, parent_id: str) -> dict[str, dict[str, str]]:
    exp = client.get_run(parent_id).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    return {r.data.tags["tunegate.stage"]: r.data.tags for r in runs}


def test_reruns_start_at_the_failed_stage_and_an_unchanged_rerun_trains_nothing(
    prefect_api, tiny_model, data_dir, tmp_path
):
    raw = tiny_raw_config(tiny_model, data_dir, tmp_path)
    impossible = {"stage": "reward", "metric": "pair_accuracy", "op": ">=", "threshold": 2.0}
    with pytest.raises(StageGateFailed, match="gates after reward failed"):
        pipeline(parse_config({**raw, "gates": [*raw["gates"], impossible]}))

    # Started again (the gate fixed): validate, build, SFT and the reward model come from the cache.
    cfg = parse_config(raw)
    first = pipeline(cfg)
    client = _client(cfg)
    stages = _stage_runs(client, first["mlflow_run_id"])
    cached = {name for name, tags in stages.items() if tags.get("tunegate.cached") == "true"}
    assert cached == {"validate", "build", "sft", "reward-model"}
    assert stages["sft"]["tunegate.cached_from"]  # the MLflow run that trained it
    assert first["registration"]["promoted"] and first["registration"]["version"] == "1"

    # Nothing changed: every stage is reused, nothing is trained or registered again.
    start = time.perf_counter()
    second = pipeline(cfg)
    seconds = time.perf_counter() - start
    stages = _stage_runs(client, second["mlflow_run_id"])
    assert {n for n, t in stages.items() if t.get("tunegate.cached") == "true"} == {
        "validate",
        "build",
        "sft",
        "reward-model",
        "judge-model",
        "align",
    }
    assert "evaluate" not in stages and "register" not in stages  # it is the champion: nothing to decide
    assert second["outcome"] == "already-champion"
    assert "champion version 1 already" in second["registration"]["reason"]
    assert len(client.search_model_versions("name='tiny-assistant'")) == 1
    print(f"cached rerun: {seconds:.1f} s")

    # A cached output altered since it was written is never used: the stage that made it runs again.
    dataset = json.loads(next((tmp_path / "runs" / "cache" / "build").glob("*.json")).read_text())
    train_file = dataset["record"]["splits"]["sft_train"]["path"]
    with open(train_file, "ab") as f:
        f.write(b"\0")
    tampered = pipeline(cfg)
    stages = _stage_runs(client, tampered["mlflow_run_id"])
    assert stages["build"].get("tunegate.cached") != "true"  # rebuilt into this run's directory
    assert {n for n, t in stages.items() if t.get("tunegate.cached") == "true"} == {
        "validate",
        "sft",
        "reward-model",
        "judge-model",
        "align",
    }  # the rebuilt splits hold what the altered copy held before: training is reused
    assert tampered["outcome"] == "already-champion"

    # A scheduled retrain on the data the champion was trained on ends at once.
    nightly = parse_config({**raw, "run": {**raw["run"], "skip_unchanged_data": True}})
    third = pipeline(nightly)
    assert third["outcome"] == "no-new-data" and "no new data" in third["registration"]["reason"]
    assert _stage_runs(client, third["mlflow_run_id"]) == {}

    # New data is new: the same retrain on a changed file trains again (stops at the impossible gate).
    changed = tmp_path / "changed"
    changed.mkdir()
    for kind in ("sft", "preferences", "prompts", "eval"):
        (changed / f"{kind}.jsonl").write_text((data_dir / f"{kind}.jsonl").read_text())
    with open(changed / "sft.jsonl", "a") as f:
        f.write(
            json.dumps(
                {"messages": [{"role": "user", "content": "New?"}, {"role": "assistant", "content": "Yes."}]}
            )
            + "\n"
        )
    fresh = tiny_raw_config(tiny_model, changed, tmp_path)
    fresh["run"]["skip_unchanged_data"] = True
    with pytest.raises(StageGateFailed, match="gates after reward failed"):
        pipeline(parse_config({**fresh, "gates": [*fresh["gates"], impossible]}))


def test_parallel_stages_train_the_reward_model_and_judge_at_once_in_child_processes(
    prefect_api, tiny_model, data_dir, tmp_path
):
    raw = tiny_raw_config(tiny_model, data_dir, tmp_path)
    raw["run"]["parallel_stages"] = True
    impossible = {"stage": "reward", "metric": "pair_accuracy", "op": ">=", "threshold": 2.0}
    with pytest.raises(StageGateFailed, match="gates after reward failed"):
        pipeline(parse_config({**raw, "gates": [*raw["gates"], impossible]}))

    cfg = parse_config(raw)
    client = _client(cfg)
    exp = client.get_experiment_by_name("test").experiment_id
    trained = ("reward-model", "judge-model")
    failed = [r for r in client.search_runs([exp]) if r.data.tags.get("tunegate.stage") in trained]
    spans = {r.data.tags["tunegate.stage"]: (r.info.start_time, r.info.end_time) for r in failed}
    (r0, r1), (j0, j1) = spans["reward-model"], spans["judge-model"]
    assert max(r0, j0) < min(r1, j1), f"the two stages did not overlap: {spans}"
    for run in failed:  # each trained in a child process of its own, its trainer logging to its stage run
        assert "train_loss" in run.data.metrics or "loss" in run.data.metrics, run.data.tags["tunegate.stage"]
    logs = {p.parent.name: p.read_text() for p in (tmp_path / "runs").glob("*/*/launch.log")}
    assert sorted(logs) == ["judge-model", "reward-model"]
    threads = max(1, torch.get_num_threads() // 2)  # the cores split between the two
    assert all(f"rank 0, {threads} CPU threads" in text for text in logs.values()), logs

    # The judge finished although the run stopped at the reward gate: both come from the cache now.
    first = pipeline(cfg)
    stages = _stage_runs(client, first["mlflow_run_id"])
    cached = {name for name, tags in stages.items() if tags.get("tunegate.cached") == "true"}
    assert cached == {"validate", "build", "sft", "reward-model", "judge-model"}
    assert first["registration"]["promoted"]


def test_only_transient_failures_are_retried():
    import errno
    import sqlite3

    from flows.retries import is_transient as _is_transient

    # by type and fields (tests/test_retries.py has the rest): wording alone decides nothing
    assert _is_transient(OSError(errno.ECONNREFUSED, "Connection refused by 127.0.0.1:5000"))
    assert _is_transient(sqlite3.OperationalError("database is locked"))
    assert not _is_transient(RuntimeError("sqlite3.OperationalError: database is locked"))
    assert not _is_transient(ValueError("sft.jsonl:7: role 'robot' is not one of the allowed roles"))


def test_dpo_pipeline_has_no_reward_model_stage(prefect_api, tiny_model, data_dir, tmp_path):
    raw = tiny_raw_config(tiny_model, data_dir, tmp_path)
    raw["align"] = {**raw["align"], "method": "dpo", "beta": 0.1}
    cfg = parse_config(raw)
    result = pipeline(cfg)
    assert result["registration"]["promoted"]
    assert "reward_score" not in result["report"]["scores"]["candidate"]
    client = _client(cfg)
    children = client.search_runs(
        [client.get_experiment_by_name("test").experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{result['mlflow_run_id']}'",
    )
    stages = {r.data.tags["tunegate.stage"] for r in children}
    assert not {"reward-model", "judge-model"} & stages and {"sft", "align", "evaluate"} <= stages
    assert "win_rate_vs_base" not in result["report"]["scores"]["candidate"]  # no judge, no win rates


def test_sft_only_pipeline_needs_only_conversations_and_an_eval_set(
    prefect_api, tiny_model, data_dir, tmp_path
):
    raw = tiny_raw_config(tiny_model, data_dir, tmp_path)
    raw["align"] = {**raw["align"], "method": "none"}
    raw["data"] = {**raw["data"], "preferences": None, "prompts": None}
    cfg = parse_config(raw)
    result = pipeline(cfg)
    assert result["registration"]["promoted"]
    client = _client(cfg)
    stages = _stage_runs(client, result["mlflow_run_id"])
    assert set(stages) == {"base-model", "validate", "build", "sft", "evaluate", "gates", "register"}
    version = client.get_model_version("tiny-assistant", result["registration"]["version"])
    sft_record = json.loads(next((tmp_path / "runs" / "cache" / "sft").glob("*.json")).read_text())
    assert version.tags["tunegate.candidate_digest"] == sft_record["record"]["digest"]  # the SFT model ships
    assert set(result["report"]["sets"]) and "reward_score" not in result["report"]["scores"]["candidate"]


def test_dpo_with_a_reward_gate_is_a_config_error(tiny_model, data_dir, tmp_path):
    from tunegate.errors import ConfigError

    raw = tiny_raw_config(tiny_model, data_dir, tmp_path)
    raw["align"] = {**raw["align"], "method": "dpo"}
    raw["gates"].append({"metric": "reward_score", "op": ">=", "baseline": "base"})
    with pytest.raises(ConfigError, match="needs a reward model, and align.method=dpo trains none"):
        parse_config(raw)


RUN = "import sys; from flows.cli import main; sys.exit(main(sys.argv[1:]))"


def test_two_concurrent_runs_promote_exactly_one(tiny_model, data_dir, tmp_path):
    """Two real pipeline processes, one MLflow store, no champion at the start of either: both pass
    their gates, exactly one takes the champion alias, the other ends not promoted and says why."""
    import os
    import subprocess
    import sys

    import yaml

    raw = tiny_raw_config(tiny_model, data_dir, tmp_path)
    cfg_path = tmp_path / "race.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    procs = []
    for i in range(2):
        home = tmp_path / f"prefect-{i}"  # each process its own ephemeral Prefect API
        env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        log = open(tmp_path / f"run-{i}.log", "w")
        procs.append(
            (
                subprocess.Popen(
                    [sys.executable, "-c", RUN, "run", "--config", str(cfg_path)],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ),
                log,
            )
        )
    for proc, log in procs:
        assert proc.wait(timeout=600) == 0, (tmp_path / log.name).read_text()[-3000:]
        log.close()
    outputs = [(tmp_path / f"run-{i}.log").read_text() for i in range(2)]
    assert sum("alias champion" in out for out in outputs) == 1
    loser = next(out for out in outputs if "NOT PROMOTED" in out)
    client = _client(parse_config(raw))
    aliases = _aliases(client)
    assert set(aliases) == {"champion"} and f"champion moved from none to {aliases['champion']}" in loser
    versions = client.search_model_versions("name='tiny-assistant'")
    assert len(versions) == 2  # both registered, one promoted
    assert {v.tags["tunegate.registration"] for v in versions} == {"complete"}
    # The stores they shared are whole: every run finished, every cached stage record reads back.
    from flows import cache

    experiment = client.get_experiment_by_name("test").experiment_id
    assert {r.info.status for r in client.search_runs([experiment])} == {"FINISHED"}
    records = list((tmp_path / "runs" / "cache").rglob("*.json"))
    assert records and all(cache.load(str(r)) is not None for r in records)
    assert not list((tmp_path / "runs" / "cache").rglob("*.tmp"))


def test_remote_store_promotion_lock_is_held_by_the_tracking_server():
    from tasks.promotion_lock import local_promotion_lock, promotion_lock
    from tunegate.config import RegistrySection
    from tunegate.errors import PromotionError

    remote = RegistrySection(tracking_uri="http://127.0.0.1:5000")
    with pytest.raises(PromotionError, match="remote store: promotion needs a cross-process lock"):
        local_promotion_lock(remote)
    # tests/test_promotion_race.py races two processes on it, each with its own Prefect API
    assert promotion_lock(remote).__name__ == "registry_lease"
    assert promotion_lock(RegistrySection(tracking_uri="sqlite:////tmp/x/mlflow.db")).__name__ == "file_lock"
