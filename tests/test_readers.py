"""Sources: compressed files, JSON layouts and true line numbers, Hub datasets. Each case reads a real
file in its public format from tests/assets (broken ones from tests/assets/bad)."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest

from data_checks.checks import check_data
from data_checks.readers import HubSource, hub_source, location, resolve_paths, resolve_sources

ASSETS = Path(__file__).parent / "assets"
BAD = ASSETS / "bad"
FIRST_ANSWER = "Hey there, pet pal! The Pup plan costs $9 per month. Wag on! - Brightpaw Care Crew"


def run(kind: str, path, **overrides):
    opts = {
        "min_rows": 1,
        "max_length": 512,
        "length_policy": "fail",
        "max_duplicate_fraction": 0.05,
        "pii_policy": "block",
        "suite_engine": "pandas",
        "out_path": Path(tempfile.mkdtemp(prefix="tunegate-read-")) / f"{kind}.jsonl",
    }
    opts.update(overrides)
    return check_data(kind, str(path) if isinstance(path, Path) else path, **opts)


def failed(report) -> dict:
    return {f.check: f for f in report.errors}


@pytest.mark.parametrize(
    ("name", "fmt", "first_where"),
    [
        ("sft.jsonl.gz", "JSON Lines, gzip", ":1"),
        ("sft.jsonl.bz2", "JSON Lines, bzip2", ":1"),
        ("sft.jsonl.xz", "JSON Lines, xz", ":1"),
        ("sft_array.json.gz", "JSON, gzip", ":2"),  # a pretty-printed array: the element's first line
        ("sft.csv.gz", "CSV, gzip", ":row 1"),
    ],
)
def test_compressed_files_are_read_as_they_stream(name, fmt, first_where):
    checked = run("sft", ASSETS / name)
    report = checked.report
    assert report.passed, report.to_text()
    assert report.rows_read == report.rows_valid == 5
    assert report.sources[0].format == fmt and report.sources[0].shapes == {"messages": 5}
    assert checked.rows[0]["completion"][0]["content"] == FIRST_ANSWER
    assert checked.rows[0]["_where"] == f"{ASSETS / name}{first_where}"


def test_a_broken_line_inside_a_gzip_file_is_named_by_its_true_line():
    finding = failed(run("sft", BAD / "sft_broken_line.jsonl.gz").report)["file parses"]
    assert finding.samples[0].where == f"{BAD / 'sft_broken_line.jsonl.gz'}:3"
    assert "not valid JSON" in finding.samples[0].value


def test_a_gzip_file_cut_short_says_it_is_damaged():
    report = run("sft", BAD / "sft_cut_short.jsonl.gz").report
    finding = failed(report)["file parses"]
    assert "cannot decompress after line" in finding.message
    assert "damaged or truncated" in finding.fix
    assert report.rows_read > 0  # the lines before the damage were still checked


def test_a_compressed_file_of_another_type_says_to_decompress():
    finding = failed(run("sft", BAD / "notes.txt.gz").report)["file parses"]
    assert "unsupported file type '.txt.gz'" in finding.message
    assert "decompress" in finding.fix and "data.jsonl.gz" in finding.fix


def test_zst_without_zstandard_says_how_to_read_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "zstandard", None)  # as on a machine without the package
    finding = failed(run("sft", ASSETS / "sft.jsonl.zst").report)["file parses"]
    assert "`zstandard` package is not installed" in finding.message
    assert "pip install zstandard" in finding.fix and "zstd -d" in finding.fix


def test_zst_is_read_when_zstandard_is_installed():
    pytest.importorskip("zstandard")
    checked = run("sft", ASSETS / "sft.jsonl.zst")
    assert checked.report.passed and checked.rows[4]["_where"].endswith("sft.jsonl.zst:5")


def test_a_directory_lists_compressed_data_files(tmp_path):
    for name in ("sft.jsonl.gz", "sft.csv.gz"):
        (tmp_path / name).write_bytes((ASSETS / name).read_bytes())
    (tmp_path / "notes.txt.gz").write_bytes((BAD / "notes.txt.gz").read_bytes())
    assert [p.name for p in resolve_paths(tmp_path)] == ["sft.csv.gz", "sft.jsonl.gz"]


def test_a_json_file_holding_one_object_is_one_row_and_its_empty_turn_is_reported():
    ok = run("sft", ASSETS / "sft_one_conversation.json")
    assert ok.report.rows_read == 1 and len(ok.rows[0]["messages"]) == 12
    report = run("sft", BAD / "sft_one_conversation_empty_turn.json").report
    finding = failed(report)["schema and roles"]
    assert finding.samples[0].where.endswith("sft_one_conversation_empty_turn.json:1")
    assert "messages[6].content must be a non-empty string" in finding.samples[0].value


def test_a_wrapper_object_gives_its_elements_with_their_lines():
    checked = run("sft", ASSETS / "sft_wrapper.json")
    lines = (ASSETS / "sft_wrapper.json").read_text().splitlines()
    starts = [i + 1 for i, line in enumerate(lines) if line == "  {"]  # indent=1: elements at depth 2
    assert checked.report.rows_read == 5
    assert [int(r["_where"].rsplit(":", 1)[1]) for r in checked.rows] == starts


def test_a_json_array_names_the_line_where_the_bad_element_starts():
    finding = failed(run("sft", BAD / "sft_array_bad_role.json").report)["schema and roles"]
    text = (BAD / "sft_array_bad_role.json").read_text().splitlines()
    where = int(finding.samples[0].where.rsplit(":", 1)[1])
    assert text[where - 1] == "  {" and '"customer"' in "\n".join(text[where : where + 4])
    assert "role is 'customer'" in finding.samples[0].value


@pytest.mark.parametrize(
    ("content", "where", "what"),
    [
        ('[{"messages": []},\n 5,\n {"a": 1}]', ":2", "element is not a JSON object"),
        ('[{"a": 1},\n {"b": 2}', ":2", "truncated"),
        ('{"data": [{"a": 1}, {"b": ]}', ":1", "not valid JSON"),
        ('[{"a": 1}]\n[2]', ":2", "extra data"),
        ("", "", "empty JSON file"),
    ],
)
def test_json_layout_problems_name_their_line(tmp_path, content, where, what):
    path = tmp_path / "x.json"
    path.write_text(content)
    finding = failed(run("sft", path).report)["file parses"]
    assert finding.samples[0].where == f"{path}{where}"
    assert what in finding.samples[0].value


def test_a_one_key_object_is_a_wrapper_only_when_its_key_is_no_row_field(tmp_path):
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    (tmp_path / "rows.json").write_text(json.dumps({"rows": [row, row]}))
    (tmp_path / "one.json").write_text(json.dumps(row))
    (tmp_path / "two_keys.json").write_text(json.dumps({"train": [row], "test": [row]}))
    assert run("sft", tmp_path / "rows.json").report.rows_read == 2
    assert run("sft", tmp_path / "one.json").report.rows_read == 1
    two = run("sft", tmp_path / "two_keys.json").report  # splits in one file: one unrecognised row
    assert two.rows_read == 1 and "keys seen: test, train" in failed(two)["recognised shape"].message


def test_tables_name_the_row_and_text_formats_the_line():
    assert location("a/sft.jsonl.gz", 3) == "a/sft.jsonl.gz:3"
    assert location("a/sft.json", 3) == "a/sft.json:3"
    assert location("a/sft.csv.gz", 3) == "a/sft.csv.gz:row 3"
    assert location("a/sft.parquet", 3) == "a/sft.parquet:row 3"
    assert location("hf:org/name@abc:train", 3) == "hf:org/name@abc:train:row 3"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("hf:Anthropic/hh-rlhf", HubSource("Anthropic/hh-rlhf")),
        ("hf:Anthropic/hh-rlhf@v1:test", HubSource("Anthropic/hh-rlhf", None, "test", "v1")),
        ("hf:org/name/harmless@" + "a" * 40 + ":train", HubSource("org/name", "harmless", "train", "a" * 40)),
        ("hf:squad:validation", HubSource("squad", None, "validation", None)),
        (
            {"hub_id": "org/name", "config": "c", "revision": "main"},
            HubSource("org/name", "c", "train", "main"),
        ),
        ("data/sft.jsonl", None),
    ],
)
def test_hub_dataset_specs(spec, expected):
    assert hub_source(spec) == expected


def test_hub_dataset_is_read_and_its_revision_recorded_with_the_hub_call_stubbed(tmp_path, monkeypatch):
    """The network edge, `load_hub_dataset`, is replaced by a local stand-in: the split comes from a
    `save_to_disk` copy of an asset, and the 'resolved' commit is a fixed sha."""
    from datasets import Dataset, load_from_disk

    import data_checks.readers as readers

    rows = [json.loads(line) for line in (ASSETS / "pref_hh_rlhf.jsonl").read_text().splitlines()]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "split"))
    sha = "0123456789abcdef0123456789abcdef01234567"
    asked: list[HubSource] = []

    def stand_in(source: HubSource):
        asked.append(source)
        return load_from_disk(str(tmp_path / "split")), sha

    monkeypatch.setattr(readers, "load_hub_dataset", stand_in)
    checked = run("preferences", "hf:Anthropic/hh-rlhf:train")
    report = checked.report
    assert asked == [HubSource("Anthropic/hh-rlhf", None, "train", None)]
    assert report.passed, report.to_text()
    assert report.files == [f"hf:Anthropic/hh-rlhf@{sha}:train"]
    source = report.sources[0]
    assert (source.format, source.revision, source.shapes) == ("Hub dataset", sha, {"hh_rlhf": 5})
    assert len(source.sha256) == 64
    assert checked.rows[2]["_where"] == f"hf:Anthropic/hh-rlhf@{sha}:train:row 3"


def test_hub_dataset_that_cannot_load_is_a_problem_with_the_fix(monkeypatch):
    import data_checks.readers as readers

    def offline(source):
        raise ConnectionError("offline")

    monkeypatch.setattr(readers, "load_hub_dataset", offline)
    finding = failed(run("sft", {"hub_id": "org/name"}).report)["file parses"]
    assert "cannot load the Hub dataset: ConnectionError: offline" in finding.message
    assert "pin a full commit sha" in finding.fix


def test_resolve_sources_keeps_hub_datasets_and_files_in_order(tmp_path):
    (tmp_path / "a.jsonl").write_text("{}\n")
    sources = resolve_sources([str(tmp_path / "a.jsonl"), "hf:org/name@v2"])
    assert sources == [tmp_path / "a.jsonl", HubSource("org/name", None, "train", "v2")]
    assert resolve_paths([str(tmp_path / "a.jsonl"), "hf:org/name@v2"]) == [tmp_path / "a.jsonl"]
