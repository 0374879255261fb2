"""Which tokens of a conversation train: per-turn loss masks for any chat template.

Templates without `{% generation %}` markers (SmolLM2's, Llama-3's, Mistral's) cannot say where an
assistant turn starts, so the mask comes from rendering the conversation prefix by prefix with the
real template: assistant message `i` trains on what `messages[: i + 1]` adds to `messages[:i]` with the
generation prompt — its content, tool calls and end-of-turn token, never the turn header, user, system
or tool text. The whitespace a template puts between turns does not train (generation stops at the
end-of-turn token before it). Each rendered prefix must be a prefix of the whole conversation; a
template that rewrites earlier turns once later ones follow (e.g. one that strips reasoning from past
answers) fails with `MaskError` rather than training on the wrong tokens, and the error names the
fixes: `sft.train_on=last_assistant`, which needs only the last turn to be stable, or another template.

Assistant turns before the first user message (an opening greeting) are context, not trained. Tool
calls render through the template with the row's `tools`; a template that drops the specs, the calls
or the results (`tool_template_problem`, one probe conversation per template) is an error too.

The validate stage's loss-mask preview and the SFT stage both call `assistant_mask`, so the preview
shows exactly what trains.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

TRAIN_ON = ("all_assistant", "last_assistant")
LAST_TURN_FIX = (
    "set sft.train_on=last_assistant (only each conversation's last answer trains), or use a chat "
    "template that renders every turn the same whatever follows it"
)
TOOL_TEMPLATE_FIX = (
    "use a tool-capable chat template such as Qwen2.5's: set model.chat_template to its text or to a "
    ".jinja file holding it, or choose a base model whose template renders `tools` and `tool_calls`"
)


class MaskError(ValueError):
    """A conversation whose trained tokens cannot be located; the message says why and the fix."""


@dataclass(frozen=True)
class Masked:
    """A rendered conversation: its tokens, 1 where a token trains, and the trained character spans."""

    text: str
    input_ids: list[int]
    mask: list[int]
    spans: list[tuple[int, int]]


def chat_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Normalised messages (data_checks/formats.py) as chat templates expect them: no null fields
    (a Parquet row has every field of the schema), tool-call arguments as objects, not JSON text."""
    out = []
    for m in messages:
        msg = {"role": m["role"], "content": m.get("content") or ""}
        if m.get("tool_calls"):
            msg["tool_calls"] = [
                {
                    **({"id": c["id"]} if c.get("id") else {}),
                    "type": "function",
                    "function": {
                        "name": c["function"]["name"],
                        "arguments": json.loads(c["function"]["arguments"] or "{}"),
                    },
                }
                for c in m["tool_calls"]
            ]
        for key in ("tool_call_id", "name"):
            if m.get(key):
                msg[key] = m[key]
        out.append(msg)
    return out


def chat_tools(tools: str | list | None) -> list[dict[str, Any]] | None:
    """A row's `tools` (JSON text, as stored) as the list `apply_chat_template(tools=...)` takes."""
    if tools is None or isinstance(tools, list):
        return tools or None
    return json.loads(tools) or None


def render(tokenizer, messages: list[dict[str, Any]], tools=None, *, generation_prompt: bool = False) -> str:
    """The conversation as the chat template writes it (template-ready messages: `chat_messages`)."""
    try:
        return tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as exc:  # noqa: BLE001 - the template's own message is the finding
        raise MaskError(f"the chat template rejects this conversation ({type(exc).__name__}: {exc})") from exc


def assistant_mask(
    tokenizer,
    messages: list[dict[str, Any]],
    tools: str | list | None = None,
    train_on: str = "all_assistant",
) -> Masked:
    """Tokenise a normalised conversation with its chat template and mark the tokens that train.

    Args:
        tokenizer: a tokenizer with a chat template (a fast one gives offsets; others are handled).
        messages: the row's `messages` (data_checks/formats.py), as stored or template-ready.
        tools: the row's `tools` (JSON text or a list), or None.
        train_on: `all_assistant` (every assistant turn after the first user message) or
            `last_assistant`.

    Returns:
        The rendered text, its token ids (as `apply_chat_template(tokenize=True)` gives them), the
        mask, and the trained character spans.

    Raises:
        MaskError: the template rejects the conversation, cannot render its tools, renders a turn
            differently once later turns follow, or leaves a turn nothing to train on.
    """
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on is {train_on!r}; use one of {', '.join(TRAIN_ON)}")
    msgs, specs = chat_messages(messages), chat_tools(tools)
    if specs is not None or any("tool_calls" in m for m in msgs):
        if (problem := tool_template_problem(tokenizer)) is not None:
            raise MaskError(problem)
    first_user = next((i for i, m in enumerate(msgs) if m["role"] == "user"), len(msgs))
    turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant" and i > first_user]
    if train_on == "last_assistant":
        turns = turns[-1:]
    if not turns:
        raise MaskError("no assistant turn after a user message: nothing to train on")
    text = render(tokenizer, msgs, specs)
    spans = []
    for i in turns:
        before = render(tokenizer, msgs[:i], specs, generation_prompt=True)
        through = render(tokenizer, msgs[: i + 1], specs)
        if not through.startswith(before):
            raise MaskError(
                f"messages[{i}] (assistant) cannot be masked: the template renders the prompt differently "
                "once the answer follows (the generation prompt is not a prefix of the turn), so the loss "
                "would fall on the wrong tokens; use a chat template whose generation prompt is a prefix "
                "of the full conversation"
            )
        if not text.startswith(through):
            raise MaskError(
                f"messages[{i}] (assistant) cannot be masked: the template renders it differently once "
                f"later turns follow, so its loss would fall on the wrong tokens; {LAST_TURN_FIX}"
            )
        end = max(len(before), len(through.rstrip()))
        if end == len(before):
            raise MaskError(f"assistant message {i} renders to nothing: nothing to train on")
        spans.append((len(before), end))
    ids, mask = _token_mask(tokenizer, text, spans)
    if 1 not in mask:
        raise MaskError("no token falls inside an assistant turn: nothing to train on")
    return Masked(text=text, input_ids=ids, mask=mask, spans=spans)


def show_mask(tokenizer, input_ids: list[int], mask: list[int]) -> str:
    """The tokens decoded, those that train inside `⟦ ⟧` (one pair per trained run)."""
    out, start = [], 0
    for k in range(1, len(input_ids) + 1):
        if k == len(input_ids) or mask[k] != mask[start]:
            piece = tokenizer.decode(input_ids[start:k])
            out.append(f"⟦{piece}⟧" if mask[start] else piece)
            start = k
    return "".join(out)


PROBE_TOOL = "tunegate_probe_lookup"
_PROBE_MARKS = {
    "the `tools` specs": "Probe description 5e1c.",
    "the assistant's `tool_calls`": "zebra-probe-93",
    "the tool results": "probe-result-7a",
}
_PROBED: dict[str, str | None] = {}


def tool_template_problem(tokenizer) -> str | None:
    """None when the chat template renders tool specs, calls and results; else what it drops, and the
    fix. Found by rendering one probe conversation per template (remembered)."""
    key = str(tokenizer.chat_template)
    if key in _PROBED:
        return _PROBED[key]
    marks = list(_PROBE_MARKS.values())
    tools = [
        {
            "type": "function",
            "function": {
                "name": PROBE_TOOL,
                "description": marks[0],
                "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
            },
        }
    ]
    call = {"type": "function", "function": {"name": PROBE_TOOL, "arguments": {"q": marks[1]}}}
    probe = [
        {"role": "user", "content": "Look it up."},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_probe1", **call}]},
        {"role": "tool", "tool_call_id": "call_probe1", "name": PROBE_TOOL, "content": marks[2]},
        {"role": "assistant", "content": "Found it."},
    ]
    try:
        text = render(tokenizer, probe, tools)
    except MaskError as exc:
        problem = f"the chat template fails on tool calls ({str(exc).split('(', 1)[-1].rstrip(')')}); "
    else:
        missing = [what for what, mark in _PROBE_MARKS.items() if mark not in text]
        dropped = " and ".join([", ".join(missing[:-1]), missing[-1]] if len(missing) > 1 else missing)
        problem = (
            f"the chat template drops {dropped} (checked with a probe conversation); " if missing else None
        )
    if problem is not None:
        problem += f"rows with tools would train without them. Fix: {TOOL_TEMPLATE_FIX}"
    _PROBED[key] = problem
    return problem


def _token_mask(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Token ids of `text` (no special tokens added: the template wrote them) and 1 for each token
    that overlaps a span, as transformers' own assistant masks do."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:  # a slow tokenizer has no offsets: count the tokens of each prefix
        return _token_mask_by_prefix(tokenizer, text, spans)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    mask = [
        int(any((b < e_span and e > s_span) or (b == e and s_span <= b < e_span) for s_span, e_span in spans))
        for b, e in offsets
    ]
    return ids, mask


def _token_mask_by_prefix(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    def encode(t: str) -> list[int]:
        return list(tokenizer(t, add_special_tokens=False)["input_ids"])

    ids = encode(text)
    mask = [0] * len(ids)
    for start, end in spans:
        head, upto = encode(text[:start]), encode(text[:end])
        if ids[: len(upto)] != upto or upto[: len(head)] != head:
            raise MaskError(
                "the tokens of an assistant turn merge with the text around it, so its loss cannot be "
                "masked exactly; use a fast tokenizer (it gives character offsets)"
            )
        mask[len(head) : len(upto)] = [1] * (len(upto) - len(head))
    return ids, mask
