"""Validation: the demo data passes; each broken fixture fails with the row named and the fix."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_checks.checks import check_data
from data_checks.formats import RowError, normalise

BAD = Path(__file__).parent / "assets" / "bad"


def run(kind: str, path, tokenizer=None, **overrides):
    opts = {
        "min_rows": 1,
        "max_length": 512,
        "length_policy": "fail",
        "max_duplicate_fraction": 0.05,
        "pii_policy": "block",
        "sample_rows": 5,
        "tokenizer": tokenizer,
        "out_path": Path(tempfile.mkdtemp(prefix="tunegate-check-")) / f"{kind}.jsonl",
    }
    opts.update(overrides)
    return check_data(kind, path if isinstance(path, list) else str(path), **opts)


def failed(report) -> dict[str, object]:
    return {f.check: f for f in report.errors}


@pytest.mark.parametrize("kind", ["sft", "preferences", "prompts", "eval"])
def test_demo_data_passes(kind, data_dir, tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    checked = run(kind, data_dir / f"{kind}.jsonl", tok, min_rows=20, max_length=256)
    assert checked.report.passed, checked.report.to_text()
    assert checked.report.rows_valid == checked.report.rows_read > 0


@pytest.mark.parametrize(
    ("fixture", "kind", "check", "where", "text"),
    [
        ("sft_not_json.jsonl", "sft", "file parses", ":2", "not valid JSON"),
        ("sft_truncated.jsonl", "sft", "file parses", ":2", "truncated last line"),
        ("sft_bad_utf8.jsonl", "sft", "file parses", ":2", "invalid UTF-8"),
        ("sft_bad_role.jsonl", "sft", "schema and roles", ":1", "allowed roles"),
        ("sft_no_assistant.jsonl", "sft", "schema and roles", ":1", "no assistant turn"),
        ("sft_empty_content.jsonl", "sft", "schema and roles", ":1", "non-empty string"),
        ("sft_unknown_shape.jsonl", "sft", "recognised shape", ":1", "match no sft format"),
        ("sft_secret.jsonl", "sft", "no secrets", ":1", "credentials"),
        ("sft_email.jsonl", "sft", "personal data", ":1", "emails or phone"),
        ("pref_identical.jsonl", "preferences", "schema and roles", ":1", "identical"),
        ("sft_mixed_shapes.jsonl", "sft", "one shape per split", ":2", "mixed shapes"),
        ("sft_array_line.jsonl", "sft", "file parses", ":1", "must hold a JSON object"),
        ("sft_json_not_list.json", "sft", "file parses", ":1", "list of objects"),
        ("sft_missing_content.jsonl", "sft", "schema and roles", ":1", "`role` and `content`"),
        ("sft_messages_not_list.jsonl", "sft", "schema and roles", ":1", "non-empty list of messages"),
        ("sft_no_user.jsonl", "sft", "schema and roles", ":1", "answers no user turn"),
        ("sft_sharegpt_bad_from.jsonl", "sft", "schema and roles", ":1", "conversations[1].from is 'robot'"),
        (
            "sft_alpaca_no_output.jsonl",
            "sft",
            "schema and roles",
            ":1",
            "alpaca[1].content must be a non-empty",
        ),
        ("sft_private_key.jsonl", "sft", "no secrets", ":1", "private key"),
        ("sft_github_token.jsonl", "sft", "no secrets", ":1", "GitHub token"),
        ("sft_phone.jsonl", "sft", "personal data", ":1", "phone number"),
        ("pref_empty_rejected.jsonl", "preferences", "schema and roles", ":1", "rejected[0].content"),
        (
            "pref_chosen_not_assistant.jsonl",
            "preferences",
            "schema and roles",
            ":1",
            "must end with an assistant",
        ),
        (
            "pref_implicit_no_shared_prompt.jsonl",
            "preferences",
            "schema and roles",
            ":1",
            "same prompt messages",
        ),
        (
            "prompts_ends_with_assistant.jsonl",
            "prompts",
            "schema and roles",
            ":1",
            "must end with a user message",
        ),
        (
            "eval_empty_expected.jsonl",
            "eval",
            "schema and roles",
            ":1",
            "`expected_any` must be a non-empty list",
        ),
        # RL prompts may carry eval checks (verifiable rewards): checked as eval rows are.
        ("prompts_bad_regex.jsonl", "prompts", "schema and roles", ":2", "`regex` does not compile"),
        ("prompts_bad_json_schema.jsonl", "prompts", "schema and roles", ":2", "not a valid JSON Schema"),
        # Public formats, each broken one way.
        (
            "sft_image_part.jsonl",
            "sft",
            "schema and roles",
            ":2",
            "messages[0].content[1] is an image (`image_url` part): images are not supported for text models",
        ),
        ("pref_kto_unpaired.jsonl", "preferences", "schema and roles", ":1", "align.method has no `kto` yet"),
        ("pref_hh_not_alternating.jsonl", "preferences", "schema and roles", ":2", "turn 2 is `Human:`"),
        ("pref_hh_no_markers.jsonl", "preferences", "schema and roles", ":2", "without hh-rlhf `Human:`"),
        (
            "pref_llamafactory_prompt_ends_with_gpt.json",
            "preferences",
            "schema and roles",
            ":19",
            "must end with a human turn",
        ),
    ],
)
def test_broken_fixture_is_reported_with_location(fixture, kind, check, where, text):
    report = run(kind, BAD / fixture).report
    assert not report.passed
    finding = failed(report)[check]
    assert text in finding.message + " ".join(s.value for s in finding.samples)
    assert finding.samples and finding.samples[0].where.endswith(fixture + where)
    assert finding.fix


def test_secret_is_masked_in_report():
    report = run("sft", BAD / "sft_secret.jsonl").report
    assert "AKIAABCDEFGHIJKLMNOP" not in report.to_text()
    assert "AKIAABCDEFGHIJKLMNOP" not in json.dumps(report.to_dict())


def test_personal_data_only_warns_when_policy_says_so():
    report = run("sft", BAD / "sft_email.jsonl", pii_policy="warn").report
    assert report.passed and [w.check for w in report.warnings] == ["personal data"]


def test_too_few_rows(data_dir):
    report = run("eval", data_dir / "eval.jsonl", min_rows=1000).report
    assert "enough rows" in failed(report)
    assert "at least 1000 required" in failed(report)["enough rows"].message


def test_duplicates_above_threshold_fail_and_below_warn(tmp_path):
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    other = [
        {"messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": "A"}]}
        for i in range(10)
    ]
    path = tmp_path / "dups.jsonl"
    rows = [
        row,
        {"messages": [{"role": "user", "content": "  HI "}, {"role": "assistant", "content": "hello"}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows + other) + "\n")
    report = run("sft", path).report
    assert failed(report)["duplicates"].samples[0].value == f"duplicate of {path}:1"
    assert run("sft", path, max_duplicate_fraction=0.5).report.passed


def test_length_policy_fail_and_drop(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    long = {"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]}
    short = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "ok"}]}
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps(short) + "\n" + json.dumps(long) + "\n")
    report = run("sft", path, tok, max_length=64).report
    assert failed(report)["length"].samples[0].where.endswith("long.jsonl:2")
    dropped = run("sft", path, tok, max_length=64, length_policy="drop")
    assert dropped.report.passed and dropped.report.dropped == {"too_long": 1}
    assert len(dropped.rows) == 1


def test_tolerated_variants_bom_crlf_blank_lines_unicode(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": f"Grüße {i} 🐾"}, {"role": "assistant", "content": "ok ✓"}]}
        for i in range(3)
    ]
    body = "\r\n\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\r\n"
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    checked = run("sft", path)
    assert checked.report.passed, checked.report.to_text()
    assert len(checked.rows) == 3


def test_loss_mask_rejects_template_that_drops_end_of_turn(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    path = tmp_path / "ok.jsonl"
    path.write_text(
        json.dumps(
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
        )
        + "\n"
    )
    assert "end-of-turn token" in failed(run("sft", path, tok).report)["loss mask"].message


@pytest.mark.parametrize(
    ("shape", "row"),
    [
        ("alpaca", {"instruction": "Add", "input": "2+2", "output": "4"}),
        (
            "sharegpt",
            {"conversations": [{"from": "human", "value": "Add\n\n2+2"}, {"from": "gpt", "value": "4"}]},
        ),
        ("prompt_completion", {"prompt": "Add\n\n2+2", "completion": "4"}),
        (
            "messages",
            {"messages": [{"role": "user", "content": "Add\n\n2+2"}, {"role": "assistant", "content": "4"}]},
        ),
    ],
)
def test_sft_shapes_map_to_trl_prompt_completion(shape, row):
    out = normalise("sft", shape, row, system_prompt="Be brief.")
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add\n\n2+2"}]
    completion = [{"role": "assistant", "content": "4"}]
    assert out == {"prompt": prompt, "completion": completion, "messages": prompt + completion}


def test_implicit_preference_prompt_is_split():
    user = {"role": "user", "content": "Hi"}
    row = {
        "chosen": [user, {"role": "assistant", "content": "Hello!"}],
        "rejected": [user, {"role": "assistant", "content": "Go away"}],
    }
    out = normalise("preferences", "preference_implicit", row)
    assert out["prompt"] == [user]
    assert out["chosen"][0]["content"] == "Hello!" and out["rejected"][0]["content"] == "Go away"


def test_bad_sharegpt_role_names_the_fix():
    with pytest.raises(RowError, match=r"conversations\[1\]\.from is 'robot'"):
        normalise(
            "sft",
            "sharegpt",
            {"conversations": [{"from": "human", "value": "x"}, {"from": "robot", "value": "y"}]},
        )


@pytest.mark.parametrize("fmt", ["json", "parquet", "csv", "hf"])
def test_other_file_formats_read_the_same_rows(fmt, data_dir, tmp_path):
    rows = [json.loads(line) for line in open(data_dir / "sft.jsonl")][:30]
    if fmt == "json":  # one element per line, after the opening bracket
        path = tmp_path / "sft.json"
        path.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")
    elif fmt == "parquet":
        path = tmp_path / "sft.parquet"
        pd.DataFrame(rows).to_parquet(path)
    elif fmt == "csv":
        path = tmp_path / "sft.csv"
        pd.DataFrame({"messages": [json.dumps(r["messages"]) for r in rows]}).to_csv(path, index=False)
    else:
        from datasets import Dataset

        path = tmp_path / "sft_hf"
        Dataset.from_list(rows).save_to_disk(str(path))
    checked = run("sft", path)
    assert checked.report.passed, checked.report.to_text()
    assert [r["completion"][0]["content"] for r in checked.rows] == [
        r["messages"][-1]["content"] for r in rows
    ]
    # Text formats give the line where the row starts; tables name the data row.
    assert checked.rows[4]["_where"].endswith(":6" if fmt == "json" else ":row 5")


def test_glob_reads_several_files(data_dir, tmp_path):
    lines = (data_dir / "sft.jsonl").read_text().splitlines()
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:10]) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(lines[10:25]) + "\n")
    checked = run("sft", str(tmp_path / "*.jsonl"))
    assert len(checked.report.files) == 2 and len(checked.rows) == 25


def test_configured_shape_overrides_detection(tmp_path):
    path = tmp_path / "a.jsonl"
    # Both `messages` and Alpaca keys: detection picks `messages`; the config can insist on Alpaca.
    row = {
        "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
        "instruction": "Add 2+2",
        "output": "4",
    }
    path.write_text(json.dumps(row) + "\n")
    assert run("sft", path).rows[0]["completion"][0]["content"] == "y"
    assert run("sft", path, shape="alpaca").rows[0]["completion"][0]["content"] == "4"
    broken = run("sft", path, shape="sharegpt").report
    assert "missing key 'conversations'" in failed(broken)["schema and roles"].message


def test_unknown_configured_shape_is_a_config_error():
    from tunegate.config import load_config
    from tunegate.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown shape for sft: 'alpacca'"):
        load_config(None, ["data.shapes.sft=alpacca"])


def test_worker_processes_and_chunking_give_the_same_result(data_dir, tiny_model, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    import data_checks.readers

    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = (data_dir / "sft.jsonl").read_text().splitlines()
    bad = '{"messages": [{"role": "robot", "content": "x"}]}'
    (tmp_path / "in.jsonl").write_text("\n".join([*rows[:40], bad, "{oops", *rows[40:], rows[0]]) + "\n")
    monkeypatch.setattr(data_checks.readers, "CHUNK_ROWS", 7)  # many chunks, samples across their edges
    one = run("sft", tmp_path / "in.jsonl", tok, workers=1, out_path=tmp_path / "one.jsonl")
    two = run("sft", tmp_path / "in.jsonl", tok, workers=2, out_path=tmp_path / "two.jsonl")
    assert one.report.to_dict() == two.report.to_dict()
    assert (tmp_path / "one.jsonl").read_bytes() == (tmp_path / "two.jsonl").read_bytes()
    assert one.frame.equals(two.frame)
    errors = failed(one.report)
    assert errors["schema and roles"].samples[0].where.endswith("in.jsonl:41")
    assert errors["file parses"].samples[0].where.endswith("in.jsonl:42")
    assert one.report.rows_read == len(rows) + 2 and one.report.rows_valid == len(rows) + 1
    dup = next(c.finding for c in one.report.checks if c.check == "duplicates")
    assert dup.samples[0].value.endswith("in.jsonl:1")


def test_report_shows_which_tokens_train(data_dir, tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    report = run("sft", data_dir / "sft.jsonl", tok).report
    example = report.examples["loss mask"]
    first = json.loads((data_dir / "sft.jsonl").read_text().splitlines()[0])
    trained = example[example.index("⟦") + 1 : example.rindex("⟧")]
    assert first["messages"][-1]["content"] in trained and tok.eos_token in trained
    assert first["messages"][-2]["content"] not in trained
    assert "tokens that train are inside" in report.to_markdown() and "⟦" in report.to_text()


def test_loss_mask_rejects_template_whose_generation_prompt_is_not_a_prefix(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    # The generation prompt opens a thinking block that the rendered conversation does not have.
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n' }}{% endif %}"
    )
    path = tmp_path / "ok.jsonl"
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    path.write_text(json.dumps(row) + "\n")
    finding = failed(run("sft", path, tok).report)["loss mask"]
    assert "renders the prompt differently" in finding.message and finding.samples[0].where.endswith(":1")


def test_duplicates_count_exact_and_normalised_repeats(tmp_path):
    row = {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"}]}
    loud = {
        "messages": [{"role": "user", "content": "HI   there"}, {"role": "assistant", "content": "hello"}]
    }
    path = tmp_path / "dups.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [row, row, loud]))
    finding = failed(run("sft", path).report)["duplicates"]
    assert finding.count == 2 and "(1 exactly)" in finding.message
    assert [s.where.rsplit(":", 1)[1] for s in finding.samples] == ["2", "3"]
    assert all(s.value.endswith("dups.jsonl:1") for s in finding.samples)


def test_a_list_of_files_is_one_split(data_dir, tmp_path):
    lines = (data_dir / "sft.jsonl").read_text().splitlines()
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:10]) + "\n")
    pd.DataFrame([json.loads(x) for x in lines[10:15]]).to_parquet(tmp_path / "b.parquet")
    checked = run("sft", [str(tmp_path / "b.parquet"), str(tmp_path / "a.jsonl")])
    assert checked.report.files == [str(tmp_path / "b.parquet"), str(tmp_path / "a.jsonl")]
    assert [r["_where"].rsplit("/", 1)[1] for r in checked.rows][:2] == ["b.parquet:row 1", "b.parquet:row 2"]
    assert len(checked.rows) == 15


def test_rows_the_chat_template_refuses_are_schema_errors(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    ok = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    sys_row = {"messages": [{"role": "system", "content": "Be terse."}, *ok["messages"]]}
    path = tmp_path / "sys.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [ok, sys_row, ok | {"id": 3}]))
    checked = run("sft", path, tok)
    finding = failed(checked.report)["schema and roles"]
    assert finding.count == 1 and finding.samples[0].where.endswith("sys.jsonl:2")
    assert (
        "chat template rejects" in finding.samples[0].value
        and "System role not supported" in finding.samples[0].value
    )
    assert checked.report.rows_valid == 2


# ---------------------------------------------------------------------------------------------------
# Public formats (tests/assets), the report's precision, the suite's engines, start-up cost

ASSETS = Path(__file__).parent / "assets"
HELLO = "Hey there, pet pal! The Pup plan costs $9 per month. Wag on! - Brightpaw Care Crew"


@pytest.mark.parametrize(
    ("asset", "shape", "prompt"),
    [
        (
            "pref_llamafactory.json",
            "preference_sharegpt",
            [
                {"role": "system", "content": "You are Brightpaw's support assistant."},
                {"role": "user", "content": "What does the Pup plan cost?"},
            ],
        ),
        (
            "pref_llamafactory_alpaca.json",
            "preference_alpaca",
            [{"role": "user", "content": "What does the Pup plan cost?"}],
        ),
        (
            "pref_hh_rlhf.jsonl",
            "hh_rlhf",
            [
                {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": "What does the Pup plan cost?"},
            ],
        ),
    ],
)
def test_public_preference_formats_map_to_the_explicit_shape(asset, shape, prompt):
    checked = run("preferences", ASSETS / asset)
    assert checked.report.passed, checked.report.to_text()
    assert checked.report.sources[0].shapes == {shape: 5}
    first = checked.rows[0]
    assert first["prompt"] == prompt
    assert first["chosen"] == [{"role": "assistant", "content": HELLO}]
    assert first["rejected"][0]["role"] == "assistant" and first["rejected"][0]["content"] != HELLO


def test_trl_string_form_with_transcript_markers_passes_with_a_warning():
    report = run("preferences", ASSETS / "pref_trl_strings_with_markers.jsonl").report
    assert report.passed
    warning = {w.check: w for w in report.warnings}["transcript markers"]
    assert warning.count == 5 and warning.samples[0].where.endswith("pref_trl_strings_with_markers.jsonl:1")
    assert warning.samples[0].value == "`prompt` holds Human:/Assistant: markers"
    assert "drop `prompt`" in warning.fix


def test_openai_content_parts_are_flattened_to_text():
    checked = run("sft", ASSETS / "sft_content_parts.jsonl")
    assert checked.report.passed, checked.report.to_text()
    assert checked.rows[0]["completion"] == [{"role": "assistant", "content": HELLO}]


def test_ignored_columns_are_listed_and_those_that_change_meaning_warned():
    report = run("sft", ASSETS / "sft_sharegpt_label_images.jsonl").report
    assert report.passed
    assert report.sources[0].ignored == {"label": 5, "id": 5, "images": 1}
    warning = {w.check: w for w in report.warnings}["ignored columns"]
    assert warning.count == 6 and "`label` (rows train whatever their label says) ×5" in warning.message
    assert [s.value.split(" ")[0] for s in warning.samples[:3]] == ["`label`", "`label`", "`images`"]
    assert warning.samples[2].where.endswith("sft_sharegpt_label_images.jsonl:2")


def test_tools_are_ignored_with_a_warning_where_the_shape_has_no_tool_support(tmp_path):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    path = tmp_path / "alpaca.jsonl"
    path.write_text(json.dumps({"instruction": "Add", "input": "2+2", "output": "4", "tools": tools}) + "\n")
    warning = {w.check: w for w in run("sft", path).report.warnings}["ignored columns"]
    assert "`tools` (the tool specs are not rendered: this shape has no tool support)" in warning.message


def test_report_names_the_detected_shape_and_mapping_per_file():
    report = run("sft", [str(ASSETS / "sft.jsonl.gz"), str(ASSETS / "sft_wrapper.json")]).report
    assert [(s.format, s.shapes) for s in report.sources] == [
        ("JSON Lines, gzip", {"messages": 5}),
        ("JSON", {"messages": 5}),
    ]
    text = report.to_text()
    assert f"source {ASSETS / 'sft.jsonl.gz'}: JSON Lines, gzip, 5 rows; shape messages (messages →" in text
    assert "shape messages" in report.to_markdown()


def test_numbers_code_and_reserved_addresses_are_not_personal_data():
    report = run("sft", ASSETS / "sft_numbers_not_pii.jsonl", pii_policy="block").report
    assert report.passed, report.to_text()


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("call (212) 736-5001 now", "phone number"),
        ("my cell is 212-736-5001.", "phone number"),
        ("reach me on +14158672291", "phone number"),
        ("ratio 0.3571428571", None),
        ("id = 12345678901234", None),
        ("at 1700000000 seconds", None),
        ("555-0142 is fictional", None),
        ("write to ana@mailbox.org", "email address"),
        ("write to ana@example.com or bo@shop.example.net", None),
        ("or to ops@host.test, qa@x.invalid, me@docs.example", None),
        ("ana@example.com and then bo@realmail.io", "email address"),
    ],
)
def test_personal_data_detectors(text, found):
    from data_checks.checks import TALLIES, Tally, _scan

    tallies = {name: Tally() for name in TALLIES}
    _scan(text, "f:1", tallies, 5)
    assert list(tallies["pii"].causes) == ([found] if found else [])


def _long_and_short(path: Path, n_short: int, n_long: int) -> Path:
    rows = [
        {"messages": [{"role": "user", "content": f"Question {i}"}, {"role": "assistant", "content": "ok"}]}
        for i in range(n_short)
    ] + [
        {
            "messages": [
                {"role": "user", "content": f"Long {i} " + "word " * 300},
                {"role": "assistant", "content": "ok"},
            ]
        }
        for i in range(n_long)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_enough_rows_counts_the_rows_kept_after_length_drops(tmp_path, tiny_model):
    from tasks.validate import load_tokenizer

    path = _long_and_short(tmp_path / "sft.jsonl", 31, 29)
    report = run(
        "sft", path, load_tokenizer(str(tiny_model)), max_length=64, length_policy="drop", min_rows=50
    ).report
    assert (report.rows_read, report.rows_valid, report.dropped) == (60, 31, {"too_long": 29})
    finding = failed(report)["enough rows"]
    assert finding.message == "31 rows kept (29 more dropped for length), at least 50 required"
    assert "60 rows read, 31 kept (29 dropped: too_long ×29)" in report.to_text()


def test_dropped_fraction_gate_names_the_rule_that_dropped_most(tmp_path, tiny_model):
    from tasks.validate import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    path = _long_and_short(tmp_path / "sft.jsonl", 143, 57)  # 28.5% too long
    report = run("sft", path, tok, max_length=64, length_policy="drop", max_dropped_fraction=0.2).report
    finding = failed(report)["dropped rows"]
    assert finding.message == (
        "57 of 200 rows (28.5%) dropped, above validate.max_dropped_fraction=0.2; most by too_long: "
        "57 rows longer than validate.max_length=64 tokens"
    )
    assert finding.samples[0].where.endswith("sft.jsonl:144")
    assert "raise validate.max_dropped_fraction" in finding.fix
    assert run("sft", path, tok, max_length=64, length_policy="drop", max_dropped_fraction=0.3).report.passed


def test_fix_texts_fit_the_policy_in_force(tmp_path, tiny_model):
    from tasks.validate import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    path = _long_and_short(tmp_path / "sft.jsonl", 9, 1)
    dropped = {w.check: w for w in run("sft", path, tok, max_length=64, length_policy="drop").report.warnings}
    assert (
        "length_policy" not in dropped["length"].fix and "raise validate.max_length" in dropped["length"].fix
    )
    fail = failed(run("sft", path, tok, max_length=64, length_policy="fail").report)["length"]
    assert "set validate.length_policy=drop" in fail.fix
    email = BAD / "sft_email.jsonl"
    warn = run("sft", email, pii_policy="warn").report.warnings[0]
    assert "pii_policy=block" in warn.fix and "pii_policy=warn" not in warn.fix
    assert "pii_policy=warn" in failed(run("sft", email, pii_policy="block").report)["personal data"].fix


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    hashes=st.lists(st.integers(0, 5), max_size=12),
    shapes=st.lists(st.sampled_from(["messages", "sharegpt"]), min_size=12, max_size=12),
    tokens=st.lists(st.integers(0, 100), min_size=12, max_size=12),
    min_rows=st.integers(0, 8),
    max_dup=st.sampled_from([0.0, 0.05, 0.3, 1.0]),
)
def test_pandas_and_gx_engines_give_the_same_verdicts(hashes, shapes, tokens, min_rows, max_dup):
    from data_checks.suites import run_suite

    n = len(hashes)
    frame = pd.DataFrame(
        {
            "norm_hash": pd.Series(hashes, dtype="int64"),
            "shape": pd.Categorical(shapes[:n], categories=["messages", "sharegpt"]),
            "n_tokens": pd.Series(tokens[:n], dtype="int32"),
        }
    )
    args = {"min_rows": min_rows, "max_tokens": 50, "max_duplicate_fraction": max_dup}
    gx = run_suite("sft", frame, **args, engine="gx")
    fast = run_suite("sft", frame, **args, engine="pandas")
    assert {k: (o.success, o.unexpected_count) for k, o in gx.items()} == {
        k: (o.success, o.unexpected_count) for k, o in fast.items()
    }


def test_plain_fast_tokenizer_loads_without_autotokenizer_and_tokenizes_the_same(tiny_model, data_dir):
    from transformers import AutoTokenizer

    from tasks.validate import load_tokenizer

    fast, auto = load_tokenizer(str(tiny_model)), AutoTokenizer.from_pretrained(tiny_model)
    assert type(fast) is type(auto)
    rows = [json.loads(line)["messages"] for line in (data_dir / "sft.jsonl").read_text().splitlines()[:20]]
    assert fast.apply_chat_template(rows, tokenize=False) == auto.apply_chat_template(rows, tokenize=False)
    texts = [m["content"] for r in rows for m in r]
    assert fast(texts)["input_ids"] == auto(texts)["input_ids"]
    assert (fast.eos_token, fast.pad_token) == (auto.eos_token, auto.pad_token)


def test_llamafactory_system_column_opens_the_conversation():
    from data_checks.formats import RowError, normalise

    row = {
        "system": "You are Brightpaw's assistant.",
        "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}],
    }
    out = normalise("sft", "sharegpt", row)
    assert out["messages"][0] == {"role": "system", "content": "You are Brightpaw's assistant."}
    assert out["prompt"][0]["role"] == "system" and out["completion"][-1]["content"] == "Hello!"
    alpaca = normalise("sft", "alpaca", {"instruction": "Say hi", "output": "Hi!", "system": "Be brief."})
    assert alpaca["messages"][0] == {"role": "system", "content": "Be brief."}
    both = {**row, "conversations": [{"from": "system", "value": "x"}, *row["conversations"]]}
    with pytest.raises(RowError, match="both a `system` column and a system turn"):
        normalise("sft", "sharegpt", both)
