"""data/public_formats.py: the demo's rows as ShareGPT, hh-rlhf, a JSON array and gzipped JSON Lines, read by
`tunegate validate` and by one whole pipeline run (configs/public-formats.yaml on the tiny model)."""

from __future__ import annotations

import json
from pathlib import Path

import generate as demo_data  # data/generate.py (tests/conftest.py puts data/ on the path)
import pandas as pd
import public_formats
import pytest
import yaml
from mlflow import MlflowClient

from flows.cli import main
from flows.pipeline import pipeline
from tests.conftest import tiny_raw_config
from tunegate.config import parse_config

# per_fact=8 is tests/conftest.py's `demo_rows`: the tiny model's tokenizer was trained on these texts, and
# the normalised rows equal test_flow's, so its gates (an eval-loss gain beyond noise) hold here too.
PER_FACT = 8
# kind -> (file, format as the report names it, detected shape)
EXPECTED = {
    "sft": ("sft_sharegpt.jsonl", "JSON Lines", "sharegpt"),
    "preferences": ("preferences_hh_rlhf.jsonl", "JSON Lines", "hh_rlhf"),
    "prompts": ("prompts.json", "JSON", "prompt_only"),
    "eval": ("eval.jsonl.gz", "JSON Lines, gzip", "eval_prompt"),
}


@pytest.fixture(scope="module")
def public_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("public")
    counts = public_formats.write_public_formats(out, seed=7, per_fact=PER_FACT)
    assert counts == {k: len(v) for k, v in demo_data.generate(7, PER_FACT).items()}
    return out


def _public_raw_config(tiny_model: Path, public_dir: Path, work: Path) -> dict:
    """tiny_raw_config reading the public-format files, with configs/public-formats.yaml's system prompt
    (hh-rlhf has none)."""
    raw = tiny_raw_config(tiny_model, public_dir, work)
    raw["data"] = {kind: str(public_dir / file) for kind, (file, _, _) in EXPECTED.items()}
    raw["model"]["system_prompt"] = demo_data.SYSTEM
    return raw


def test_the_files_are_in_each_tools_format_and_the_same_bytes_again(public_dir, demo_rows, tmp_path):
    first = json.loads((public_dir / "sft_sharegpt.jsonl").read_text().splitlines()[0])
    assert [t["from"] for t in first["conversations"]] == ["system", "human", "gpt"]
    pair = json.loads((public_dir / "preferences_hh_rlhf.jsonl").read_text().splitlines()[0])
    source = demo_rows["preferences"][0]
    user, chosen = source["prompt"][1]["content"], source["chosen"][0]["content"]
    assert pair["chosen"] == f"\n\nHuman: {user}\n\nAssistant: {chosen}"
    assert json.loads((public_dir / "prompts.json").read_text()) == demo_rows["prompts"]
    public_formats.write_public_formats(tmp_path, seed=7, per_fact=PER_FACT)
    for file, _, _ in EXPECTED.values():
        assert (tmp_path / file).read_bytes() == (public_dir / file).read_bytes(), file


def test_tunegate_validate_detects_each_shape_without_warnings(public_dir, tiny_model, tmp_path, capsys):
    cfg = tmp_path / "public.yaml"
    cfg.write_text(yaml.safe_dump(_public_raw_config(tiny_model, public_dir, tmp_path)))
    for kind, (file, fmt, shape) in EXPECTED.items():
        path = public_dir / file
        assert main(["validate", str(path), "--kind", kind, "--config", str(cfg)]) == 0, kind
        out = capsys.readouterr().out
        assert f"source {path}: {fmt}, " in out and f"; shape {shape} (" in out, out
        assert "PASSED" in out and "warn " not in out, out


@pytest.mark.integration  # a whole pipeline run (about a minute); `make test-fast` skips it
def test_pipeline_runs_on_public_formats(prefect_api, tiny_model, public_dir, demo_rows, tmp_path):
    cfg = parse_config(_public_raw_config(tiny_model, public_dir, tmp_path))
    result = pipeline(cfg)

    run_dir = Path(result["run_dir"])
    reports = {r["kind"]: r for r in json.loads((run_dir / "validate" / "validation.json").read_text())}
    for kind, (file, fmt, shape) in EXPECTED.items():
        (source,) = reports[kind]["sources"]
        rows = len(demo_rows[kind])
        assert (Path(source["file"]).name, source["format"], source["shapes"]) == (file, fmt, {shape: rows})
        assert [c["check"] for c in reports[kind]["checks"] if c["finding"]] == [], kind

    reg = result["registration"]
    assert result["verdict"]["passed"] and reg["promoted"] and reg["version"] == "1"
    client = MlflowClient(tracking_uri=cfg.registry.tracking_uri, registry_uri=cfg.registry.tracking_uri)
    assert str(client.get_model_version_by_alias("tiny-assistant", "champion").version) == "1"

    # The SFT splits hold the ShareGPT conversations as messages (system, user, assistant), all of them.
    build = run_dir / "build"
    sft = pd.concat([pd.read_parquet(build / f"{s}.parquet") for s in ("sft_train", "sft_eval")])
    built = sorted(tuple((m["role"], m["content"]) for m in row) for row in sft["messages"])
    written = sorted(tuple((m["role"], m["content"]) for m in r["messages"]) for r in demo_rows["sft"])
    assert len(pd.read_parquet(build / "sft_train.parquet")) > 0 and built == written
    # hh-rlhf has no system prompt: model.system_prompt puts the demo's back on every preference prompt.
    pref = pd.read_parquet(build / "pref_train.parquet")
    assert all([m["role"] for m in p] == ["system", "user"] for p in pref["prompt"])
    assert {p[0]["content"] for p in pref["prompt"]} == {demo_data.SYSTEM}
