"""The build stage: TRL formats, stable split, dedupe, and byte-identical re-runs."""

from __future__ import annotations

import json

import pandas as pd

from tasks.build import build_datasets
from tasks.validate import validate_data
from tunegate.artifacts import ModelArtifact, sha256_file
from tunegate.config import BuildSection, DataSection, ValidateSection


def _validated(data_dir, tiny_model, out):
    data = DataSection(**{k: str(data_dir / f"{k}.jsonl") for k in ("sft", "preferences", "prompts", "eval")})
    base = ModelArtifact(path=str(tiny_model), role="base", base_model="tiny", digest="x")
    return validate_data(ValidateSection(max_length=256), data, base, out_dir=out)


def test_build_is_byte_identical_across_runs(data_dir, tiny_model, tmp_path):
    validated = _validated(data_dir, tiny_model, tmp_path / "v")
    a = build_datasets(BuildSection(), validated, out_dir=tmp_path / "a", seed=3)
    b = build_datasets(BuildSection(), validated, out_dir=tmp_path / "b", seed=3)
    assert {k: f.sha256 for k, f in a.splits.items()} == {k: f.sha256 for k, f in b.splits.items()}
    assert open(a.manifest, "rb").read() == open(b.manifest, "rb").read()  # digests, counts, drops
    manifest = json.loads(open(a.manifest).read())
    assert (
        manifest["counts"]["sft"]["sft_train"] + manifest["counts"]["sft"]["sft_eval"]
        == manifest["counts"]["sft"]["after_dedupe"]
    )


def test_build_writes_trl_formats_without_leakage(data_dir, tiny_model, tmp_path):
    ds = build_datasets(
        BuildSection(eval_fraction=0.2),
        _validated(data_dir, tiny_model, tmp_path / "v"),
        out_dir=tmp_path / "d",
        seed=3,
    )
    train = pd.read_parquet(ds.splits["sft_train"].path)
    held = pd.read_parquet(ds.splits["sft_eval"].path)
    assert set(train.columns) == {"prompt", "completion", "messages", "tools"}
    assert all(
        list(p) + list(c) == [{"role": m["role"], "content": m["content"]} for m in msgs]
        for p, c, msgs in zip(train["prompt"], train["completion"], train["messages"], strict=True)
    )
    assert 0 < len(held) < len(train)
    key = lambda df: {" ".join(m["content"] for m in p) for p in df["prompt"]}  # noqa: E731
    assert not key(train) & key(held)
    pref = pd.read_parquet(ds.splits["pref_train"].path)
    assert set(pref.columns) == {"prompt", "chosen", "rejected"}
    assert set(pd.read_parquet(ds.splits["eval"].path).columns) == {
        "prompt",
        "set",
        "expected_any",
        "exact",
        "regex",
        "json_schema",
        "refuse",
    }


def test_duplicates_are_dropped_and_counted(tmp_path, tiny_model, data_dir):
    rows = [json.loads(line) for line in open(data_dir / "sft.jsonl")]
    dup_dir = tmp_path / "in"
    dup_dir.mkdir()
    for k in ("preferences", "prompts", "eval"):
        (dup_dir / f"{k}.jsonl").write_text((data_dir / f"{k}.jsonl").read_text())
    (dup_dir / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + rows[:3]))
    ds = build_datasets(
        BuildSection(), _validated(dup_dir, tiny_model, tmp_path / "v"), out_dir=tmp_path / "d", seed=1
    )
    assert ds.dropped["sft: duplicate"] == 3
    assert ds.splits["sft_train"].rows + ds.splits["sft_eval"].rows == len(rows)
    dropped = [json.loads(line) for line in open(tmp_path / "d" / "dropped.jsonl")]
    assert [d["where"].rsplit(":", 1)[1] for d in dropped] == [str(len(rows) + i) for i in (1, 2, 3)]
    assert dropped[0]["reason"] == f"duplicate of {dup_dir / 'sft.jsonl'}:1"


def test_manifest_records_sources_counts_and_every_dropped_row(tmp_path, tiny_model, data_dir):
    rows = [json.loads(line) for line in open(data_dir / "sft.jsonl")]
    src = tmp_path / "in"
    src.mkdir()
    for k in ("preferences", "prompts", "eval"):
        (src / f"{k}.jsonl").write_text((data_dir / f"{k}.jsonl").read_text())
    long = {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]}
    (src / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*rows, long, rows[0]]))
    ds = build_datasets(
        BuildSection(), _validated(src, tiny_model, tmp_path / "v"), out_dir=tmp_path / "d", seed=1
    )
    manifest = json.loads(open(ds.manifest).read())
    assert manifest["sources"][str(src / "sft.jsonl")] == sha256_file(src / "sft.jsonl")
    n = len(rows)
    assert manifest["counts"]["sft"] == {
        "read": n + 2,
        "valid": n + 2,
        "kept": n + 1,
        "validated": n + 1,
        "after_dedupe": n,
        "sft_train": ds.splits["sft_train"].rows,
        "sft_eval": ds.splits["sft_eval"].rows,
    }
    assert manifest["dropped"] == {"sft: duplicate": 1, "sft: too long": 1}
    dropped = [json.loads(line) for line in open(tmp_path / "d" / manifest["dropped_rows"]["path"])]
    assert [(d["step"], d["where"].rsplit(":", 1)[1]) for d in dropped] == [
        ("validate", str(n + 1)),
        ("build", str(n + 2)),
    ]
    assert dropped[0]["reason"].startswith("too long: ") and "validate.max_length=256" in dropped[0]["reason"]


def test_eval_prompt_seen_in_training_is_leakage(data_dir, tiny_model, tmp_path):
    import pytest

    from tunegate.errors import DataValidationError

    leaky = tmp_path / "in"
    leaky.mkdir()
    for k in ("sft", "preferences", "prompts"):
        (leaky / f"{k}.jsonl").write_text((data_dir / f"{k}.jsonl").read_text())
    train_q = json.loads((data_dir / "sft.jsonl").read_text().splitlines()[3])["messages"][1]["content"]
    evals = (data_dir / "eval.jsonl").read_text().splitlines()
    row = json.loads(evals[0])
    row["prompt"][-1]["content"] = "  " + train_q.upper()
    evals[0] = json.dumps(row)
    (leaky / "eval.jsonl").write_text("\n".join(evals) + "\n")
    with pytest.raises(DataValidationError, match=r"no train/eval leakage at .*eval\.jsonl:1"):
        _validated(leaky, tiny_model, tmp_path / "v")
    report = json.loads((tmp_path / "v" / "validation.json").read_text())
    finding = next(c["finding"] for r in report for c in r["checks"] if c["check"] == "no train/eval leakage")
    assert (
        "also in training at" in finding["samples"][0]["value"]
        and "sft.jsonl:4" in finding["samples"][0]["value"]
    )


def test_user_formats_round_trip_to_trl_parquet(tmp_path, tiny_model):
    """Alpaca, ShareGPT, prompt-completion and implicit-prompt preferences, written as users bring
    them, come out of validate + build as TRL's conversational datasets."""
    from datasets import Dataset

    src = tmp_path / "in"
    src.mkdir()
    n = 12
    alpaca = [{"instruction": f"Add {i} and 2", "input": "", "output": str(i + 2)} for i in range(n)]
    sharegpt = [
        {"conversations": [{"from": "human", "value": f"Name pet {i}"}, {"from": "gpt", "value": f"Rex {i}"}]}
        for i in range(n)
    ]
    pairs = [
        {
            "chosen": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"good {i}"}],
            "rejected": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"bad {i}"}],
        }
        for i in range(n)
    ]
    prompts = [{"prompt": f"Tell me about cat {i}"} for i in range(n)]
    evals = [{"prompt": f"Hold-out {i}", "expected_any": [f"a{i}"]} for i in range(n)]
    (src / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in alpaca))
    pd.DataFrame({"conversations": [json.dumps(r["conversations"]) for r in sharegpt]}).to_csv(
        src / "sharegpt.csv", index=False
    )
    pd.DataFrame(pairs).to_parquet(src / "pairs.parquet")
    (src / "prompts.json").write_text(json.dumps(prompts))
    (src / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    data = DataSection(
        sft=[str(src / "alpaca.jsonl")],
        preferences=str(src / "pairs.parquet"),
        prompts=str(src / "prompts.json"),
        eval=str(src / "eval.jsonl"),
    )
    base = ModelArtifact(path=str(tiny_model), role="base", base_model="tiny", digest="x")
    cfg = ValidateSection(max_length=256, min_rows={k: 1 for k in ("sft", "preferences", "prompts", "eval")})
    for sft_file, first_prompt, first_answer in (
        ("alpaca.jsonl", "Add 0 and 2", "2"),
        ("sharegpt.csv", "Name pet 0", "Rex 0"),
    ):
        data = data.model_copy(update={"sft": [str(src / sft_file)]})
        validated = validate_data(
            cfg, data, base, out_dir=tmp_path / sft_file / "v", system_prompt="Be kind."
        )
        ds = build_datasets(
            BuildSection(eval_fraction=0.25), validated, out_dir=tmp_path / sft_file / "d", seed=0
        )
        sft = Dataset.from_parquet([ds.splits["sft_train"].path, ds.splits["sft_eval"].path])
        assert sft.column_names == ["prompt", "completion", "messages", "tools"] and len(sft) == n
        row = next(r for r in sft if r["prompt"][-1]["content"] == first_prompt)
        assert row["prompt"][0] == {"role": "system", "content": "Be kind."}
        assert row["completion"] == [{"role": "assistant", "content": first_answer}]
    pref_splits = ("pref_train", "pref_judge", "pref_eval")
    pref = Dataset.from_parquet([ds.splits[name].path for name in pref_splits if ds.splits[name].rows])
    assert pref.column_names == ["prompt", "chosen", "rejected"]
    row = next(r for r in pref if r["prompt"][-1]["content"] == "Q0")
    assert row["chosen"] == [{"role": "assistant", "content": "good 0"}]
    assert row["rejected"] == [{"role": "assistant", "content": "bad 0"}]
    prompt_rows = Dataset.from_parquet(ds.splits["prompts"].path)
    assert prompt_rows[0]["prompt"][-1] == {"role": "user", "content": "Tell me about cat 0"}
    assert Dataset.from_parquet(ds.splits["eval"].path)[0]["expected_any"] == ["a0"]


def test_the_judge_pairs_share_no_pair_and_no_prompt_with_the_proxy_pairs(data_dir, tiny_model, tmp_path):
    """pref_train (the proxy reward model), pref_judge (the judge) and pref_eval split by normalised
    prompt: a prompt written again in other case and spacing, with other answers, stays on one side."""
    pairs = [json.loads(line) for line in open(data_dir / "preferences.jsonl")]
    src = tmp_path / "in"
    src.mkdir()
    for k in ("sft", "prompts", "eval"):
        (src / f"{k}.jsonl").write_text((data_dir / f"{k}.jsonl").read_text())
    echoes = []
    for pair in pairs[:20]:
        prompt = [
            {**m, "content": "  " + m["content"].lower() + " "} if m["role"] == "user" else m
            for m in pair["prompt"]
        ]
        better = [{"role": "assistant", "content": pair["chosen"][-1]["content"] + " Anything else?"}]
        echoes.append({**pair, "prompt": prompt, "chosen": better})
    (src / "preferences.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs + echoes))
    validated = _validated(src, tiny_model, tmp_path / "v")
    ds = build_datasets(BuildSection(judge_fraction=0.3), validated, out_dir=tmp_path / "d", seed=3)

    def norm(messages) -> str:
        return " ".join(" ".join(m["content"] for m in messages).lower().split())

    splits = {}
    for name in ("pref_train", "pref_judge", "pref_eval"):
        df = pd.read_parquet(ds.splits[name].path)
        splits[name] = {
            "pairs": {
                (norm(p), norm(c), norm(r))
                for p, c, r in zip(df["prompt"], df["chosen"], df["rejected"], strict=True)
            },
            "prompts": {norm(p) for p in df["prompt"]},
            "rows": len(df),
        }
    assert sum(s["rows"] for s in splits.values()) == len(pairs) + len(echoes)  # every pair, once
    for a, b in (("pref_train", "pref_judge"), ("pref_train", "pref_eval"), ("pref_judge", "pref_eval")):
        assert not splits[a]["pairs"] & splits[b]["pairs"], (a, b)
        assert not splits[a]["prompts"] & splits[b]["prompts"], (a, b)
    # Each echo shares its original's normalised prompt: both sides hold one prompt twice, 20 in all.
    assert sum(s["rows"] - len(s["prompts"]) for s in splits.values()) == 20
    not_held_out = splits["pref_train"]["rows"] + splits["pref_judge"]["rows"]
    assert 0.2 < splits["pref_judge"]["rows"] / not_held_out < 0.4  # about judge_fraction
    assert (
        json.loads(open(ds.manifest).read())["counts"]["preferences"]["pref_judge"]
        == splits["pref_judge"]["rows"]
    )

    # No judge: no pref_judge split, and the pairs it would have taken train the proxy (or DPO).
    none = build_datasets(BuildSection(judge_fraction=0.0), validated, out_dir=tmp_path / "n", seed=3)
    assert "pref_judge" not in none.splits
    assert none.splits["pref_train"].rows == not_held_out
    assert none.splits["pref_eval"].sha256 == ds.splits["pref_eval"].sha256  # the held-out pairs stay put
