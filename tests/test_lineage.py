"""`tunegate lineage` and the lineage graph: one real tiny pipeline run, then its chain read back from
MLflow alone."""

from __future__ import annotations

import re

import pytest
from mlflow import MlflowClient

from flows.cli import main
from flows.lineage import Node, lineage, render_tree
from tests.conftest import tiny_raw_config
from tunegate.config import parse_config
from tunegate.errors import ConfigError

# Whole pipeline runs, real servers or subprocess drills: not in `make test-fast`.
pytestmark = pytest.mark.integration

STAGES = (
    "base-model",
    "validate",
    "build",
    "sft",
    "reward-model",
    "judge-model",
    "align",
    "evaluate",
    "gates",
    "register",
)


@pytest.fixture(scope="module")
def registered(prefect_api, tiny_model, data_dir, tmp_path_factory):
    """One pipeline run that registers and promotes version 1: (tracking uri, pipeline result)."""
    from flows.pipeline import pipeline

    work = tmp_path_factory.mktemp("lineage")
    cfg = parse_config(tiny_raw_config(tiny_model, data_dir, work))
    result = pipeline(cfg)
    assert result["registration"]["version"] == "1"
    return cfg.registry.tracking_uri, result


def _client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _tree(capsys, ref: str, uri: str) -> str:
    capsys.readouterr()
    assert main(["lineage", ref, f"registry.tracking_uri={uri}"]) == 0
    return capsys.readouterr().out


def test_lineage_by_alias_prints_the_chain_from_version_to_data_and_base_model(registered, capsys):
    uri, result = registered
    tree = _tree(capsys, "tiny-assistant@champion", uri)
    parent = _client(uri).get_run(result["mlflow_run_id"])
    tags = parent.data.tags

    assert tree.startswith("model tiny-assistant version 1\n") and "aliases: @champion" in tree
    assert f"pipeline run {result['mlflow_run_id']}" in tree
    assert result["flow_run_id"] in tree and tags["prefect.flow_run_url"] in tree
    assert f"git commit: {tags['tunegate.git_commit']}" in tree
    assert f"config digest: {tags['tunegate.config_digest']} (config/resolved.json, matches)" in tree
    assert f"base model {tags['tunegate.base_model']}" in tree
    assert tags["tunegate.base_model_digest"][:16] in tree
    assert f"transformers {tags['tunegate.version.transformers']}" in tree
    positions = [tree.index(f"── {stage} (") for stage in STAGES]
    assert positions == sorted(positions), "stages in pipeline order"
    assert "metrics: train_loss=" in tree
    inputs = {d.dataset.name: d for d in parent.inputs.dataset_inputs}
    for name, kind in (("sft_train", "sft"), ("sft_eval", "sft"), ("eval", "eval")):
        rows = next(t.value for t in inputs[name].tags if t.key == "rows")
        block = tree.split(f"── {name} (")[1].split("── ")[0]
        assert inputs[name].dataset.digest in block and f"rows: {rows}\n" in block
        assert f"validation: {kind} PASS: " in block and "raw input: " in block
    assert "├── " in tree and "└── " in tree and "│   " in tree


def test_lineage_by_version_prints_the_same_tree_as_by_alias(registered, capsys):
    uri, _ = registered
    by_alias = _tree(capsys, "tiny-assistant@champion", uri)
    assert _tree(capsys, "tiny-assistant/1", uri) == by_alias
    assert _tree(capsys, "models:/tiny-assistant/1", uri) == by_alias


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("tiny-assistant@nope", r"no alias 'nope' \(its aliases: @champion -> 1\)"),
        ("tiny-assistant/7", r"has no version 7 \(its versions: 1\)"),
        ("no-such/1", r"no registered model 'no-such' in sqlite:.*registered models: .*tiny-assistant"),
        ("tiny-assistant", r"is not NAME@ALIAS or NAME/VERSION"),
    ],
)
def test_a_bad_reference_exits_1_with_one_line_naming_the_fix(registered, capsys, ref, message):
    uri, _ = registered
    assert main(["lineage", ref, f"registry.tracking_uri={uri}"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("tunegate: ") and ref.split("/")[0].split("@")[0] in err
    with pytest.raises(ConfigError, match=message):
        lineage(uri, ref)


def test_a_version_the_pipeline_did_not_register_has_no_lineage(registered, tiny_model):
    uri, _ = registered
    client = _client(uri)
    client.create_registered_model("hand-made")
    client.create_model_version("hand-made", source=str(tiny_model))
    with pytest.raises(ConfigError, match="has no tunegate.parent_run_id tag: it was not registered by"):
        lineage(uri, "hand-made/1")


def test_a_missing_store_is_named_instead_of_created(tmp_path):
    missing = tmp_path / "nowhere" / "mlflow.db"
    with pytest.raises(ConfigError, match=f"no MLflow store at {re.escape(str(missing))}"):
        lineage(f"sqlite:///{missing}", "tiny-assistant@champion")
    assert not missing.exists()


def test_pipeline_logs_the_lineage_tree_and_graph_to_the_parent_run(registered, tmp_path):
    uri, result = registered
    client = _client(uri)
    run_id = result["mlflow_run_id"]
    logged = {a.path: a for a in client.list_artifacts(run_id, "lineage")}
    assert set(logged) == {"lineage/lineage.png", "lineage/lineage.txt"}
    png = client.download_artifacts(run_id, "lineage/lineage.png", str(tmp_path))
    data = open(png, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    text = open(client.download_artifacts(run_id, "lineage/lineage.txt", str(tmp_path))).read()
    assert text.startswith("model tiny-assistant version 1\n") and "── register (" in text


def test_render_tree_draws_branches_like_tree():
    root = Node(
        "root",
        "model",
        {"a": "1"},
        [
            Node("left", "group", children=[Node("leaf", "stage", {"b": "2"})]),
            Node("right", "stage", {"c": "3"}),
        ],
    )
    assert render_tree(root) == "\n".join(
        [
            "root",
            "│   a: 1",
            "├── left",
            "│   └── leaf",
            "│           b: 2",
            "└── right",
            "        c: 3",
        ]
    )
