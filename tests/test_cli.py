"""The `tunegate` command line: exit codes and what a person reads."""

from __future__ import annotations

import pytest
import yaml

from flows.cli import main, summary
from tests.conftest import tiny_raw_config

BAD = "tests/assets/bad"


def _config_file(tmp_path, tiny_model, data_dir):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_raw_config(tiny_model, data_dir, tmp_path)))
    return str(path)


def test_validate_exit_codes(tmp_path, tiny_model, data_dir, capsys):
    cfg = _config_file(tmp_path, tiny_model, data_dir)
    assert main(["validate", str(data_dir / "sft.jsonl"), "--kind", "sft", "--config", cfg]) == 0
    assert "PASSED" in capsys.readouterr().out
    assert main(["validate", f"{BAD}/sft_bad_role.jsonl", "--kind", "sft", "--config", cfg]) == 1
    out = capsys.readouterr().out
    assert "FAIL  schema and roles" in out and "sft_bad_role.jsonl:1" in out and "fix:" in out
    assert (
        main(["validate", str(data_dir / "preferences.jsonl"), "--kind", "preference", "--config", cfg]) == 0
    )
    assert "preferences" in capsys.readouterr().out
    with pytest.raises(SystemExit) as usage:
        main(["validate", str(data_dir / "sft.jsonl"), "--kind", "sfft"])
    assert usage.value.code == 2
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("sft:\n  max_stpes: 1\n")
    assert main(["validate", str(data_dir / "sft.jsonl"), "--kind", "sft", "--config", str(bad_cfg)]) == 2
    assert "did you mean 'max_steps'" in capsys.readouterr().err


def test_config_command_prints_resolved_yaml(capsys):
    assert main(["config", "--config", "configs/demo.yaml", "sft.max_steps=7"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["sft"]["max_steps"] == 7 and resolved["validate"]["pii_policy"] == "block"


def test_summary_names_version_alias_and_uis():
    result = {
        "verdict": {"markdown": "## Gate verdict: PASS"},
        "registration": {"promoted": True, "model_name": "m", "version": "3", "aliases": ["champion"]},
        "tracking_uri": "sqlite:///mlflow.db",
        "mlflow_run_id": "abc",
        "experiment": "e",
        "run_dir": "runs/x",
        "flow_run_id": "f-1",
    }
    text = summary(result)
    assert "m version 3, alias champion (models:/m@champion)" in text
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in text and "flow run f-1" in text
    rejected = summary(
        {**result, "registration": {"promoted": False, "reason": "gates failed: x", "version": None}}
    )
    assert "NOT PROMOTED: gates failed: x" in rejected
