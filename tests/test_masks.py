"""Per-turn loss masks and tool calls: every assistant turn trains under real chat templates (built
here into local tokenizers), tool calls validate and render, and an SFT run trains on them."""

from __future__ import annotations

import copy
import functools
import json
import math
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from data_checks.checks import check_data
from data_checks.formats import RowError, normalise
from data_checks.masks import MaskError, assistant_mask, show_mask, tool_template_problem

ASSETS = Path(__file__).parent / "assets"
TEMPLATES = ASSETS / "templates"
BAD = ASSETS / "bad"
SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<s>",
    "</s>",
]
# template -> (bos, end-of-turn token): the tokens each real template writes.
FAMILIES = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>"),
    "qwen2_5": ("<|im_start|>", "<|im_end|>"),
    "mistral": ("<s>", "</s>"),  # [INST] ... [/INST]: no system role, no generation prompt
}
ANSWERS = ["Hello, pet pal!", "Plus costs $19 a month.", "Wag on, bye!"]
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": ANSWERS[0]},
    {"role": "user", "content": "How much is Plus?"},
    {"role": "assistant", "content": ANSWERS[1]},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": ANSWERS[2]},
]
TOOLS_ROWS = ASSETS / "sft_tools.jsonl"


@functools.cache
def _bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [m["content"] for m in CONVERSATION] + ["user assistant system tool [INST] [/INST]"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts * 10, trainer)
    return tok


def _tokenizer(family: str, template: str | None = None):
    from transformers import PreTrainedTokenizerFast

    bos, eot = FAMILIES[family]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_bpe(), bos_token=bos, eos_token=eot, pad_token=eot, unk_token="<|endoftext|>"
    )
    tok.chat_template = template or (TEMPLATES / f"{family}.jinja").read_text()
    return tok


def _trained_runs(tokenizer, masked) -> list[str]:
    """Each run of trained tokens, decoded."""
    runs, run = [], []
    for token, bit in zip(masked.input_ids, masked.mask, strict=True):
        if bit:
            run.append(token)
        elif run:
            runs.append(tokenizer.decode(run))
            run = []
    return [*runs, tokenizer.decode(run)] if run else runs


def _ids(encoded) -> list[int]:
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_assistant_turn_trains_and_nothing_else(family):
    tok = _tokenizer(family)
    _, eot = FAMILIES[family]
    conversation = CONVERSATION[1:] if family == "mistral" else CONVERSATION
    masked = assistant_mask(tok, conversation)
    # the tokens are the template's own tokenisation of the conversation
    assert masked.input_ids == _ids(tok.apply_chat_template(conversation, tokenize=True))
    # the trained tokens are exactly each answer with its end-of-turn token, nothing of the rest
    assert _trained_runs(tok, masked) == [answer + eot for answer in ANSWERS]
    last = assistant_mask(tok, conversation, train_on="last_assistant")
    assert _trained_runs(tok, last) == [ANSWERS[-1] + eot]
    assert last.input_ids == masked.input_ids


def test_tool_calls_train_and_tool_results_do_not():
    tok = _tokenizer("qwen2_5")
    row = normalise("sft", "messages", json.loads(TOOLS_ROWS.read_text().splitlines()[0]))
    runs = _trained_runs(tok, assistant_mask(tok, row["messages"], row["tools"]))
    assert runs == [
        '<tool_call>\n{"name": "get_plan_price", "arguments": {"plan": "Basic"}}\n</tool_call><|im_end|>',
        "The Basic plan costs $9 a month.<|im_end|>",
        'Booking it now.\n<tool_call>\n{"name": "book_grooming", "arguments": {"pet": "Rex", "day": "Monday"}}'
        "\n</tool_call><|im_end|>",
        "Done: Rex is booked for grooming on Monday at 10:00.<|im_end|>",
    ]
    masked = assistant_mask(tok, row["messages"], row["tools"])
    assert "get_plan_price" in masked.text.split("<|im_start|>user")[0]  # the specs are in the prompt
    assert "booked: Rex Monday 10:00" in masked.text and not any("booked:" in r for r in runs)


def test_a_template_that_rewrites_earlier_turns_fails_and_names_last_assistant():
    # Like reasoning templates: the last answer opens with an empty thinking block, earlier ones do not.
    rewriting = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and loop.last %}"
        "{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' + m['content'] + '<|im_end|>\n' }}"
        "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    tok = _tokenizer("chatml", rewriting)
    with pytest.raises(MaskError, match=r"messages\[2\] \(assistant\).*sft.train_on=last_assistant"):
        assistant_mask(tok, CONVERSATION)
    runs = _trained_runs(tok, assistant_mask(tok, CONVERSATION, train_on="last_assistant"))
    assert runs == [f"<think>\n\n</think>\n\n{ANSWERS[-1]}<|im_end|>"]


def test_a_template_that_cannot_render_tools_is_a_clear_error_with_the_fix():
    problem = tool_template_problem(_tokenizer("chatml"))  # ignores `tools` and `tool_calls`
    assert "drops the `tools` specs and the assistant's `tool_calls`" in problem
    assert "model.chat_template" in problem and "Qwen2.5" in problem
    assert tool_template_problem(_tokenizer("qwen2_5")) is None
    row = normalise("sft", "messages", json.loads(TOOLS_ROWS.read_text().splitlines()[0]))
    with pytest.raises(MaskError, match="model.chat_template"):
        assistant_mask(_tokenizer("chatml"), row["messages"], row["tools"])


def _run(path: Path, tokenizer=None, **overrides):
    opts = {
        "min_rows": 1,
        "max_length": 2048,
        "length_policy": "fail",
        "max_duplicate_fraction": 0.5,
        "pii_policy": "block",
        "tokenizer": tokenizer,
        "out_path": Path(tempfile.mkdtemp(prefix="tunegate-masks-")) / "sft.jsonl",
    }
    return check_data("sft", str(path), **{**opts, **overrides})


def test_validation_reports_tool_rows_a_template_cannot_render_with_file_and_line():
    report = _run(TOOLS_ROWS, _tokenizer("chatml")).report
    finding = next(f for f in report.errors if f.check == "schema and roles")
    assert finding.count == 8 and finding.samples[0].where.endswith("sft_tools.jsonl:1")
    assert "model.chat_template" in finding.message


def test_validation_passes_tool_rows_and_previews_every_trained_span():
    checked = _run(TOOLS_ROWS, _tokenizer("qwen2_5"))
    assert checked.report.passed, checked.report.to_text()
    preview = checked.report.examples["loss mask"]
    assert preview.count("⟦") == 4 and "⟦<tool_call>" in preview
    assert "⟦The Basic plan costs $9 a month.<|im_end|>⟧" in preview
    row = checked.rows[0]
    assert row["tools"] and [m["role"] for m in row["messages"]][:4] == [
        "system",
        "user",
        "assistant",
        "tool",
    ]
    assert row["completion"] == [
        {"role": "assistant", "content": "Done: Rex is booked for grooming on Monday at 10:00."}
    ]


@pytest.mark.parametrize(
    ("fixture", "text"),
    [
        (
            "sft_tool_bad_arguments.jsonl",
            r"messages\[2\]\.tool_calls\[0\]\.function\.arguments is not valid JSON",
        ),
        ("sft_tool_undeclared.jsonl", r"calls `cancel_plan`, which `tools` does not declare"),
        (
            "sft_tool_unanswered.jsonl",
            r"messages\[2\]\.tool_calls\[0\] \(`get_plan_price`, id call_0a\) is not answered",
        ),
        ("sft_tool_wrong_id.jsonl", r"tool_call_id is 'call_9z', which no waiting call has"),
    ],
)
def test_broken_tool_calls_are_reported_with_file_line_and_fix(fixture, text):
    import re

    finding = next(f for f in _run(BAD / fixture).report.errors if f.check == "schema and roles")
    assert finding.samples[0].where.endswith(f"{fixture}:1")
    assert re.search(text, finding.samples[0].value), finding.samples[0].value
    assert ";" in finding.samples[0].value  # each message goes on to say how to fix it


def test_llama_factory_function_call_and_observation_map_onto_tool_calls():
    openai = normalise("sft", "messages", json.loads(TOOLS_ROWS.read_text().splitlines()[0]))
    specs = [t["function"] for t in json.loads(openai["tools"])]  # LLaMA-Factory: bare specs
    sharegpt = {
        "conversations": [
            {"from": "system", "value": "You are Brightpaw's support assistant."},
            {"from": "human", "value": "How much is the Basic plan?"},
            {
                "from": "function_call",
                "value": json.dumps({"name": "get_plan_price", "arguments": {"plan": "Basic"}}),
            },
            {"from": "observation", "value": json.dumps({"plan": "Basic", "price": "$9"})},
            {"from": "gpt", "value": "The Basic plan costs $9 a month."},
        ],
        "tools": json.dumps(specs),
    }
    mapped = normalise("sft", "sharegpt", sharegpt)
    assert mapped["tools"] == openai["tools"]
    without_ids = [
        {**m, "tool_calls": [{**c, "id": None} for c in m["tool_calls"]]} if "tool_calls" in m else m
        for m in openai["messages"][:5]
    ]
    assert mapped["messages"] == [{k: v for k, v in m.items() if k != "tool_call_id"} for m in without_ids]
    two_calls = copy.deepcopy(sharegpt)
    two_calls["conversations"][2]["value"] = json.dumps(
        [json.loads(two_calls["conversations"][2]["value"])] * 2
    )
    with pytest.raises(
        RowError, match=r"conversations\[2\]\.tool_calls\[1\] .* is not answered before conversations\[4\]"
    ):
        normalise("sft", "sharegpt", two_calls)


def test_a_final_tool_call_may_stay_unanswered_and_trains():
    row = json.loads(TOOLS_ROWS.read_text().splitlines()[0])
    row["messages"] = row["messages"][:3]  # user asks, the assistant calls: the call is the lesson
    norm = normalise("sft", "messages", row)
    tok = _tokenizer("qwen2_5")
    assert _trained_runs(tok, assistant_mask(tok, norm["messages"], norm["tools"])) == [
        '<tool_call>\n{"name": "get_plan_price", "arguments": {"plan": "Basic"}}\n</tool_call><|im_end|>'
    ]


def test_sft_refuses_trl_masking_names_and_points_at_train_on(tmp_path):
    from tasks.trainer_args import trainer_config
    from tunegate.config import SftSection
    from tunegate.errors import ConfigError

    for name in ("assistant_only_loss", "completion_only_loss"):
        with pytest.raises(ConfigError, match=rf"sft.trl_args.{name}: set sft.train_on instead"):
            trainer_config("sft", SftSection(trl_args={name: True}), output_dir=tmp_path, seed=1)


def test_model_chat_template_reads_a_file_and_refuses_a_missing_one(tmp_path):
    from tasks.base_model import chat_template_text
    from tunegate.errors import ConfigError

    text = (TEMPLATES / "qwen2_5.jinja").read_text()
    assert chat_template_text(str(TEMPLATES / "qwen2_5.jinja")) == text
    assert chat_template_text(text) == text
    with pytest.raises(ConfigError, match="model.chat_template: .* is neither a Jinja template nor a file"):
        chat_template_text(str(tmp_path / "missing.jinja"))


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory, demo_rows):
    """The tiny model with a tokenizer that has learnt the tool conversations' text, positions for
    them (the Qwen2.5 tool header alone is ~600 characters), and its own ChatML template: the Qwen2.5
    template comes in as `model.chat_template`, as a user would give it."""
    from tests.conftest import build_tiny_model

    tok = _tokenizer("qwen2_5")
    rendered = [
        assistant_mask(
            tok, (n := normalise("sft", "messages", json.loads(line)))["messages"], n["tools"]
        ).text
        for line in TOOLS_ROWS.read_text().splitlines()
    ]
    texts = [m["content"] for r in demo_rows["sft"] for m in r["messages"]] + rendered * 3
    path = build_tiny_model(tmp_path_factory.mktemp("tiny-tools"), texts)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
    return path


def test_a_multi_turn_tool_calling_file_validates_builds_and_trains(tool_model, data_dir, tmp_path):
    from tasks.build import build_datasets
    from tasks.model_io import load_causal_lm
    from tasks.sft import _masked, train_sft
    from tasks.validate import validate_data
    from tunegate.artifacts import ModelArtifact
    from tunegate.config import BuildSection, DataSection, SftSection, ValidateSection

    qwen = (TEMPLATES / "qwen2_5.jinja").read_text()
    base = ModelArtifact(path=str(tool_model), role="base", base_model="tiny", digest="x", chat_template=qwen)
    data = DataSection(
        sft=str(TOOLS_ROWS), **{k: str(data_dir / f"{k}.jsonl") for k in ("preferences", "prompts", "eval")}
    )
    checks = ValidateSection(
        max_length=1024, min_rows={k: 1 for k in ("sft", "preferences", "prompts", "eval")}
    )
    validated = validate_data(checks, data, base, out_dir=tmp_path / "v")
    dataset = build_datasets(BuildSection(eval_fraction=0.2), validated, out_dir=tmp_path / "d", seed=1)
    train_path = dataset.splits["sft_train"].path
    built = pd.read_parquet(train_path)
    assert len(built) + dataset.splits["sft_eval"].rows == 8 and built["tools"].notna().all()

    # the masks the trainer gets: each assistant turn (calls and answers), no tool result, no user text
    _, tokenizer = load_causal_lm(str(tool_model), chat_template=qwen)
    masked = _masked(train_path, tokenizer, "all_assistant", "sft_train")
    for ids, mask, messages in zip(
        masked["input_ids"], masked["assistant_masks"], built["messages"], strict=True
    ):
        runs = _trained_runs(tokenizer, type("M", (), {"input_ids": ids, "mask": mask}))
        assistants = [m for m in messages if m["role"] == "assistant"]
        assert len(runs) == len(assistants) == 4
        for run, message in zip(runs, assistants, strict=True):
            assert run.endswith("<|im_end|>") and (message["content"] or "<tool_call>") in run
            if message["tool_calls"] is not None:
                assert f'"name": "{message["tool_calls"][0]["function"]["name"]}"' in run
        assert not any(
            m["content"] in "".join(runs) for m in messages if m["role"] in ("tool", "user", "system")
        )

    cfg = SftSection(
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        logging_steps=1,
        max_length=1024,
        checkpoint_steps=0,
        lora={"r": 4, "lora_alpha": 8},
    )
    sft = train_sft(cfg, dataset, base, out_dir=tmp_path / "sft", seed=1)
    assert sft.steps == 2 and math.isfinite(sft.metrics["train_loss"]) and sft.metrics["weights_delta"] > 0
    preview = (tmp_path / "sft" / "loss_mask.txt").read_text()  # from the labels TRL trained on
    assert (
        preview.count("⟦") == 4
        and "⟦<tool_call>" in preview
        and "booked: " not in "".join(part.split("⟧")[0] for part in preview.split("⟦")[1:])
    )
    _, saved = load_causal_lm(sft.path)
    assert saved.chat_template == qwen  # the trained model keeps the template it was trained with


def test_show_mask_brackets_each_trained_run():
    tok = _tokenizer("chatml")
    masked = assistant_mask(tok, CONVERSATION)
    assert show_mask(tok, masked.input_ids, masked.mask).count("⟦") == 3
