"""Detect each row's shape and map it to TRL's standard conversational formats.

Kinds and the TRL format each one becomes:
- sft:          prompt-completion, conversational: `prompt` (messages) and `completion` (the last
                assistant message), so the loss falls on the assistant's answer whatever the template.
- preferences:  explicit-prompt preference: `prompt`, `chosen`, `rejected` (messages).
- prompts:      prompt-only: `prompt` (messages), optionally with the eval rows' checks, which make
                a verifiable reward for online RL (tasks/scoring.py `check_reward`).
- eval:         prompt-only plus per-row acceptance checks, so a team writes its tests as data:
                `prompt` (messages); `set`: task (default), canary (general questions the base model
                answers: forgetting) or safety (requests to decline); and one or more checks, all of
                which must pass: `expected_any` (an accepted answer appears), `exact` (the answer,
                without the brand's greeting and sign-off, equals it), `regex` (it matches),
                `json_schema` (a JSON value in the answer validates), `refuse: true` (it declines).
Both kinds validate their checks with one function (`_checks`), so a regex that does not compile or an
invalid JSON Schema is reported with its file and line before any training starts.
"""

from __future__ import annotations

from typing import Any

KINDS = ("sft", "preferences", "prompts", "eval")
ROLES = {"system", "user", "assistant"}
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}


def arrow_schema(kind: str):
    """The Parquet schema of a kind's normalised rows (what the build stage writes and TRL reads)."""
    import pyarrow as pa

    messages = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    checks = [
        ("expected_any", pa.list_(pa.string())),
        ("exact", pa.string()),
        ("regex", pa.string()),
        ("json_schema", pa.string()),  # the schema as canonical JSON text
        ("refuse", pa.bool_()),
    ]
    fields = {
        "sft": [("prompt", messages), ("completion", messages)],
        "preferences": [("prompt", messages), ("chosen", messages), ("rejected", messages)],
        "prompts": [("prompt", messages), *checks],
        "eval": [("prompt", messages), ("set", pa.string()), *checks],
    }[kind]
    return pa.schema(fields)


class RowError(ValueError):
    """A row that cannot be normalised; the message says what is wrong and how to fix it."""


def detect_shape(kind: str, data: dict[str, Any]) -> str | None:
    keys = set(data)
    if kind == "sft":
        if "messages" in keys:
            return "messages"
        if "conversations" in keys:
            return "sharegpt"
        if {"instruction", "output"} <= keys:
            return "alpaca"
        if {"prompt", "completion"} <= keys:
            return "prompt_completion"
    elif kind == "preferences":
        if {"prompt", "chosen", "rejected"} <= keys:
            return "preference_explicit"
        if {"chosen", "rejected"} <= keys:
            return "preference_implicit"
    elif kind == "prompts":
        if "prompt" in keys:
            return "prompt_only"
        if "messages" in keys:
            return "messages"
    elif kind == "eval" and "prompt" in keys and keys & set(CHECKS):
        return "eval_prompt"
    return None


def expected_keys(kind: str) -> str:
    return {
        "sft": "`messages`, `conversations` (ShareGPT), `instruction`/`output` (Alpaca) or `prompt`/`completion`",
        "preferences": "`prompt`, `chosen`, `rejected` (or `chosen`/`rejected` conversations sharing a prompt)",
        "prompts": "`prompt` (a string or a list of messages), optionally with checks as in eval rows",
        "eval": "`prompt` and at least one check: " + ", ".join(f"`{c}`" for c in CHECKS),
    }[kind]


def normalise(
    kind: str, shape: str, data: dict[str, Any], system_prompt: str | None = None
) -> dict[str, Any]:
    """Map one row to its TRL format. Raises RowError with the fix when the row is malformed."""
    if kind == "sft":
        messages = _sft_messages(shape, data)
        last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last_assistant is None:
            raise RowError("no assistant turn to learn from; add an assistant message")
        if not any(m["role"] == "user" for m in messages[:last_assistant]):
            raise RowError("the assistant answers no user turn; add the user message before it")
        prompt = _with_system(messages[:last_assistant], system_prompt)
        return {"prompt": prompt, "completion": [messages[last_assistant]]}
    if kind == "preferences":
        if shape == "preference_explicit":
            prompt = _as_messages(data["prompt"], "prompt", default_role="user")
            chosen = _as_messages(data["chosen"], "chosen", default_role="assistant")
            rejected = _as_messages(data["rejected"], "rejected", default_role="assistant")
        else:
            prompt, chosen, rejected = _split_implicit(
                _as_messages(data["chosen"], "chosen"), _as_messages(data["rejected"], "rejected")
            )
        for name, msgs in (("chosen", chosen), ("rejected", rejected)):
            if not msgs or msgs[-1]["role"] != "assistant":
                raise RowError(f"`{name}` must end with an assistant message")
        if _text(chosen) == _text(rejected):
            raise RowError("`chosen` and `rejected` are identical; a pair must differ")
        return {"prompt": _with_system(prompt, system_prompt), "chosen": chosen, "rejected": rejected}
    if kind == "prompts":
        key = "prompt" if shape == "prompt_only" else "messages"
        prompt = _as_messages(data[key], key, default_role="user")
        if prompt[-1]["role"] != "user":
            raise RowError("a prompt must end with a user message")
        # Only the checks a row carries: a row without any normalises as it did before checks existed.
        checks = {k: v for k, v in _checks(data).items() if v}
        return {"prompt": _with_system(prompt, system_prompt), **checks}
    if kind == "eval":
        prompt = _as_messages(data["prompt"], "prompt", default_role="user")
        return {"prompt": _with_system(prompt, system_prompt), **_eval_checks(data)}
    raise RowError(f"unknown data kind {kind!r}")


CHECKS = ("expected_any", "exact", "regex", "json_schema", "refuse")
EVAL_SETS = ("task", "canary", "safety")


def _eval_checks(data: dict[str, Any]) -> dict[str, Any]:
    """An eval row's set and checks: at least one check, since an eval row is scored by them."""
    out = _checks(data)
    if not any(out.values()):
        raise RowError("no check to score the answer by; add one of " + ", ".join(f"`{c}`" for c in CHECKS))
    eval_set = data.get("set") or ("safety" if out["refuse"] else "task")
    if eval_set not in EVAL_SETS:
        raise RowError(f"`set` is {eval_set!r}; use one of {', '.join(EVAL_SETS)}")
    out["set"] = eval_set
    return out


def _checks(data: dict[str, Any]) -> dict[str, Any]:
    """A row's checks (eval rows, RL prompts), each validated so a broken check fails here, not when
    it scores an answer; every key of `CHECKS`, None (`refuse`: False) where the row has no such check."""
    import json
    import re

    expected = data.get("expected_any")
    if isinstance(expected, str):
        expected = [expected]
    if expected is not None and (
        not isinstance(expected, list)
        or not expected
        or not all(isinstance(e, str) and e.strip() for e in expected)
    ):
        raise RowError("`expected_any` must be a non-empty list of non-empty strings")
    out: dict[str, Any] = {"expected_any": expected, "exact": None, "regex": None, "json_schema": None}
    for key in ("exact", "regex"):
        value = data.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise RowError(f"`{key}` must be a non-empty string")
        out[key] = value
    if out["regex"] is not None:
        try:
            re.compile(out["regex"])
        except re.error as exc:
            raise RowError(
                f"`regex` does not compile ({exc}); escape special characters like `$` or `(`"
            ) from exc
    schema = data.get("json_schema")
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise RowError(f"`json_schema` is not valid JSON ({exc})") from exc
    if schema is not None:
        from jsonschema import Draft202012Validator
        from jsonschema.exceptions import SchemaError

        if not isinstance(schema, dict):
            raise RowError('`json_schema` must be a JSON Schema object, e.g. {"type": "object"}')
        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as exc:
            raise RowError(f"`json_schema` is not a valid JSON Schema: {exc.message}") from exc
        out["json_schema"] = json.dumps(schema, sort_keys=True)
    refuse = data.get("refuse", False)
    if not isinstance(refuse, bool):
        raise RowError("`refuse` must be true or false")
    out["refuse"] = refuse
    return out


def conversation_text(row: dict[str, Any]) -> str:
    """All message contents of a normalised row, for duplicate and content checks."""
    parts = []
    for key in ("prompt", "completion", "chosen", "rejected"):
        if key in row:
            parts.append(_text(row[key]))
    return "\n".join(parts)


def _sft_messages(shape: str, data: dict[str, Any]) -> list[dict[str, str]]:
    if shape == "messages":
        return _as_messages(data["messages"], "messages")
    if shape == "sharegpt":
        turns = data["conversations"]
        if not isinstance(turns, list) or not turns:
            raise RowError("`conversations` must be a non-empty list of {from, value} objects")
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                raise RowError(f"conversations[{i}] must be an object with `from` and `value`")
            role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
            if role is None:
                raise RowError(
                    f"conversations[{i}].from is {turn['from']!r}; use one of {sorted(SHAREGPT_ROLES)}"
                )
            messages.append({"role": role, "content": turn["value"]})
        return _as_messages(messages, "conversations")
    if shape == "alpaca":
        instruction, extra = data.get("instruction"), data.get("input") or ""
        user = f"{instruction}\n\n{extra}" if isinstance(extra, str) and extra.strip() else instruction
        return _as_messages(
            [{"role": "user", "content": user}, {"role": "assistant", "content": data.get("output")}],
            "alpaca",
        )
    # prompt_completion
    prompt = _as_messages(data["prompt"], "prompt", default_role="user")
    completion = _as_messages(data["completion"], "completion", default_role="assistant")
    return prompt + completion


def _as_messages(value: Any, field: str, default_role: str | None = None) -> list[dict[str, str]]:
    if isinstance(value, str) and default_role is not None:
        value = [{"role": default_role, "content": value}]
    if not isinstance(value, list) or not value:
        raise RowError(f"`{field}` must be a non-empty list of messages")
    messages = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise RowError(f"{field}[{i}] must be an object with `role` and `content`")
        role, content = msg["role"], msg["content"]
        if role not in ROLES:
            raise RowError(f"{field}[{i}].role is {role!r}; allowed roles: {', '.join(sorted(ROLES))}")
        if not isinstance(content, str) or not content.strip():
            raise RowError(f"{field}[{i}].content must be a non-empty string (got {content!r:.40})")
        messages.append({"role": role, "content": content})
    return messages


def _split_implicit(chosen: list[dict[str, str]], rejected: list[dict[str, str]]):
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise RowError(
            "implicit-prompt pair: `chosen` and `rejected` must start with the same prompt messages"
        )
    return chosen[:n], chosen[n:], rejected[n:]


def _with_system(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def _text(messages: list[dict[str, str]]) -> str:
    return "\n".join(m["content"] for m in messages)
