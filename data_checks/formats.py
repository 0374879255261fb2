"""Detect each row's shape and map it to TRL's standard conversational formats.

Kinds and the TRL format each one becomes:
- sft:          `messages`, the whole conversation as SFT trains on it (every assistant turn, or the
                last with `sft.train_on=last_assistant`; data_checks/masks.py marks the tokens), with
                tool calls and results when the row has them, and `tools` (the function specs, JSON);
                plus TRL's prompt-completion view of its last assistant turn, `prompt` and
                `completion` (plain role/content messages), which evaluation scores.
                Tool calls come in TRL/OpenAI's shape (assistant `tool_calls`, `tool` messages, a
                `tools` column) or LLaMA-Factory's ShareGPT one (`function_call`/`observation` turns,
                a `tools` string), and are checked: arguments are JSON objects, every called name is
                declared in `tools`, and every call is answered by a tool message (matching
                `tool_call_id` where given) before the conversation goes on; only the last assistant
                message's calls may stay unanswered (the example then teaches the call itself).
- preferences:  explicit-prompt preference: `prompt`, `chosen`, `rejected` (messages). Read from TRL's
                explicit and implicit-prompt shapes (messages or strings), LLaMA-Factory's ShareGPT
                (`conversations` + `chosen`/`rejected` message objects, optional `system`) and Alpaca
                (`instruction`/`input` + `chosen`/`rejected` strings) preference shapes, and Anthropic
                hh-rlhf transcripts (`chosen`/`rejected` strings of `\n\nHuman: …\n\nAssistant: …`
                turns, split into messages). Unpaired rows (`prompt`/`completion`/`label`, KTO's
                shape) are refused with how to pair them: no stage trains on them yet.
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

import re
from typing import Any

KINDS = ("sft", "preferences", "prompts", "eval")
ROLES = {"system", "user", "assistant"}
SFT_ROLES = ROLES | {"tool"}  # SFT conversations may call tools and carry their results
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",  # LLaMA-Factory: the assistant's tool call(s), as JSON
    "observation": "tool",  # LLaMA-Factory: the tool's result
    "tool": "tool",
}


def arrow_schema(kind: str):
    """The Parquet schema of a kind's normalised rows (what the build stage writes and TRL reads)."""
    import pyarrow as pa

    messages = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    call = pa.struct(
        [
            ("id", pa.string()),
            ("type", pa.string()),
            ("function", pa.struct([("name", pa.string()), ("arguments", pa.string())])),  # JSON text
        ]
    )
    conversation = pa.list_(
        pa.struct(
            [
                ("role", pa.string()),
                ("content", pa.string()),
                ("tool_calls", pa.list_(call)),
                ("tool_call_id", pa.string()),
                ("name", pa.string()),
            ]
        )
    )
    checks = [
        ("expected_any", pa.list_(pa.string())),
        ("exact", pa.string()),
        ("regex", pa.string()),
        ("json_schema", pa.string()),  # the schema as canonical JSON text
        ("refuse", pa.bool_()),
    ]
    fields = {
        "sft": [
            ("prompt", messages),
            ("completion", messages),
            ("messages", conversation),
            ("tools", pa.string()),  # JSON list of function specs; null without tools
        ],
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
        if {"chosen", "rejected"} <= keys:
            if "conversations" in keys:
                return "preference_sharegpt"
            if "instruction" in keys:
                return "preference_alpaca"
            if "prompt" in keys:
                return "preference_explicit"
            if isinstance(data["chosen"], str) and isinstance(data["rejected"], str):
                return "hh_rlhf"
            return "preference_implicit"
        if {"completion", "label"} <= keys:
            return "unpaired_preference"
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
        "preferences": "`prompt`, `chosen`, `rejected` (or `chosen`/`rejected` conversations sharing a prompt, "
        "hh-rlhf transcripts, or LLaMA-Factory's `conversations` + `chosen`/`rejected`)",
        "prompts": "`prompt` (a string or a list of messages), optionally with checks as in eval rows",
        "eval": "`prompt` and at least one check: " + ", ".join(f"`{c}`" for c in CHECKS),
    }[kind]


def normalise(
    kind: str, shape: str, data: dict[str, Any], system_prompt: str | None = None
) -> dict[str, Any]:
    """Map one row to its TRL format. Raises RowError with the fix when the row is malformed."""
    if kind == "sft":
        messages, tools = _sft_messages(shape, data)
        last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last_assistant is None:
            raise RowError("no assistant turn to learn from; add an assistant message")
        if not any(m["role"] == "user" for m in messages[:last_assistant]):
            raise RowError("the assistant answers no user turn; add the user message before it")
        conversation = _with_system(messages[: last_assistant + 1], system_prompt)
        field = {"sharegpt": "conversations", "prompt_completion": "prompt+completion"}.get(shape, "messages")
        _check_tool_calls(conversation, tools, field, offset=len(conversation) - last_assistant - 1)
        row = {
            "prompt": _plain(conversation[:-1]),
            "completion": _plain(conversation[-1:]),
            "messages": conversation,
        }
        return {**row, "tools": tools} if tools is not None else row
    if kind == "preferences":
        prompt, chosen, rejected = _preference_pair(shape, data)
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
    """All message contents of a normalised row, for duplicate and content checks; an SFT row's whole
    conversation, its tool calls and its tool specs included."""
    if "messages" in row:
        return "\n".join([_text(row["messages"]), *([row["tools"]] if row.get("tools") else [])])
    parts = []
    for key in ("prompt", "completion", "chosen", "rejected"):
        if key in row:
            parts.append(_text(row[key]))
    return "\n".join(parts)


def _sft_messages(shape: str, data: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    """An SFT row's conversation (tool calls and results allowed) and its tool specs as JSON text."""
    tools = _tools(data.get("tools"))
    if shape == "messages":
        return _as_messages(data["messages"], "messages", tool_calls=True), tools
    if shape == "sharegpt":
        return _system_column(data, _sharegpt_messages(data["conversations"])), tools
    if shape == "alpaca":
        instruction, extra = data.get("instruction"), data.get("input") or ""
        user = f"{instruction}\n\n{extra}" if isinstance(extra, str) and extra.strip() else instruction
        return _system_column(
            data,
            _as_messages(
                [{"role": "user", "content": user}, {"role": "assistant", "content": data.get("output")}],
                "alpaca",
            ),
        ), None
    # prompt_completion
    prompt = _as_messages(data["prompt"], "prompt", default_role="user", tool_calls=True)
    completion = _as_messages(data["completion"], "completion", default_role="assistant", tool_calls=True)
    return prompt + completion, tools


def _system_column(data: dict[str, Any], messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """LLaMA-Factory keeps a ShareGPT or Alpaca row's system prompt in a `system` column: it opens the
    conversation, unless the conversation has a system turn of its own."""
    system = data.get("system")
    if system is None or (isinstance(system, str) and not system.strip()):
        return messages
    if not isinstance(system, str):
        raise RowError("`system` must be a string (the system prompt)")
    if messages and messages[0]["role"] == "system":
        raise RowError("the row has both a `system` column and a system turn: keep one of them")
    return [{"role": "system", "content": system}, *messages]


def _sharegpt_messages(turns: Any) -> list[dict[str, Any]]:
    """ShareGPT turns as messages; LLaMA-Factory's `function_call` turn (JSON: one call or a list of
    them) becomes an assistant message with `tool_calls`, its `observation` turn a tool message."""
    if not isinstance(turns, list) or not turns:
        raise RowError("`conversations` must be a non-empty list of {from, value} objects")
    messages: list[dict[str, Any]] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise RowError(f"conversations[{i}] must be an object with `from` and `value`")
        tag = str(turn["from"]).lower()
        role = SHAREGPT_ROLES.get(tag)
        if role is None:
            raise RowError(
                f"conversations[{i}].from is {turn['from']!r}; use one of {sorted(SHAREGPT_ROLES)}"
            )
        if tag != "function_call":
            messages.append({"role": role, "content": turn["value"]})
            continue
        calls = _json_value(
            turn["value"],
            f"conversations[{i}].value (function_call)",
            'write the call as {"name": "get_weather", "arguments": {"city": "Paris"}} (or a list of calls)',
        )
        calls = calls if isinstance(calls, list) else [calls]
        if not calls or not all(isinstance(c, dict) and "name" in c for c in calls):
            raise RowError(
                f"conversations[{i}].value (function_call) must be a call object "
                '{"name": ..., "arguments": {...}} or a non-empty list of them'
            )
        tool_calls = [
            {"type": "function", "function": {"name": c["name"], "arguments": c.get("arguments", {})}}
            for c in calls
        ]
        messages.append({"role": "assistant", "content": None, "tool_calls": tool_calls})
    return _as_messages(messages, "conversations", tool_calls=True)


def _as_messages(
    value: Any, field: str, default_role: str | None = None, tool_calls: bool = False
) -> list[dict[str, Any]]:
    """Messages checked for roles and content. With `tool_calls` (SFT conversations), `tool` messages
    and assistant `tool_calls` are allowed too; an assistant message that calls tools needs no text."""
    if isinstance(value, str) and default_role is not None:
        value = [{"role": default_role, "content": value}]
    if not isinstance(value, list) or not value:
        raise RowError(f"`{field}` must be a non-empty list of messages")
    roles = SFT_ROLES if tool_calls else ROLES
    messages = []
    for i, msg in enumerate(value):
        calls = msg.get("tool_calls") if tool_calls and isinstance(msg, dict) else None
        if not isinstance(msg, dict) or "role" not in msg or ("content" not in msg and calls is None):
            raise RowError(f"{field}[{i}] must be an object with `role` and `content`")
        role, content = msg["role"], content_text(msg.get("content"), f"{field}[{i}]")
        if not isinstance(role, str) or role not in roles:
            raise RowError(f"{field}[{i}].role is {role!r}; allowed roles: {', '.join(sorted(roles))}")
        if calls is not None:
            if role != "assistant":
                raise RowError(f"{field}[{i}] has `tool_calls`, which only assistant messages may have")
            if content is not None and not isinstance(content, str):
                raise RowError(f"{field}[{i}].content must be a string or null (got {content!r:.40})")
            message = {
                "role": role,
                "content": content or "",
                "tool_calls": _tool_calls(calls, f"{field}[{i}]"),
            }
        else:
            if role == "tool" and isinstance(content, dict | list):  # a structured result: keep it as JSON
                content = _json_text(content)
            if not isinstance(content, str) or not content.strip():
                raise RowError(f"{field}[{i}].content must be a non-empty string (got {content!r:.40})")
            message = {"role": role, "content": content}
        if role == "tool":
            for key in ("tool_call_id", "name"):
                if msg.get(key) is not None:
                    if not isinstance(msg[key], str) or not msg[key]:
                        raise RowError(f"{field}[{i}].{key} must be a non-empty string")
                    message[key] = msg[key]
        messages.append(message)
    return messages


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """Assistant tool calls as {id, type, function: {name, arguments}}, arguments as JSON text of an
    object (Parquet needs one type; data_checks/masks.py turns it back into an object to render)."""
    if not isinstance(calls, list) or not calls:
        raise RowError(f"{where}.tool_calls must be a non-empty list of calls")
    out = []
    for j, call in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if (
            not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
            or not function["name"]
        ):
            raise RowError(
                f"{at} must be an object with `function`: {{`name`, `arguments`}} "
                '(e.g. {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}})'
            )
        if call.get("type", "function") != "function":
            raise RowError(f"{at}.type is {call['type']!r}; only `function` calls are supported")
        call_id = call.get("id")
        if call_id is not None and (not isinstance(call_id, str) or not call_id):
            raise RowError(f"{at}.id must be a non-empty string")
        arguments = {} if function.get("arguments") is None else function["arguments"]
        if isinstance(arguments, str):
            arguments = _json_value(
                arguments,
                f"{at}.function.arguments",
                'write the arguments as a JSON object, e.g. {"city": "Paris"}',
            )
        if not isinstance(arguments, dict):
            raise RowError(
                f"{at}.function.arguments must be a JSON object (got {type(arguments).__name__}); "
                'name each argument, e.g. {"city": "Paris"}'
            )
        out.append(
            {
                "id": call_id,
                "type": "function",
                "function": {"name": function["name"], "arguments": _json_text(arguments)},
            }
        )
    return out


def _tools(value: Any) -> str | None:
    """A row's tool specs as JSON text: TRL/OpenAI's {type: function, function: {name, description,
    parameters}} entries, or LLaMA-Factory's bare {name, description, parameters} (wrapped)."""
    if value is None or value != value or (isinstance(value, str) and not value.strip()):  # NaN: CSV
        return None
    example = '[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]'
    if isinstance(value, str):
        value = _json_value(value, "`tools`", f"give a JSON list of function specs, e.g. {example}")
    if not isinstance(value, list):
        raise RowError(f"`tools` must be a list of function specs, e.g. {example}")
    specs, names = [], set()
    for i, spec in enumerate(value):
        function = spec.get("function", spec) if isinstance(spec, dict) else None
        if (
            not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
            or not function["name"]
        ):
            raise RowError(f"tools[{i}] must be a function spec with a `name`, e.g. {example}")
        if not isinstance(function.get("parameters", {}), dict):
            raise RowError(f'tools[{i}].parameters must be a JSON Schema object, e.g. {{"type": "object"}}')
        if function["name"] in names:
            raise RowError(f"tools[{i}] declares `{function['name']}` again; declare each function once")
        names.add(function["name"])
        specs.append({"type": "function", "function": function})
    return _json_text(specs) if specs else None


def _check_tool_calls(messages: list[dict[str, Any]], tools: str | None, field: str, offset: int = 0) -> None:
    """Every called function is declared in `tools`; every call is answered by a tool message before
    the conversation goes on (the last message's calls excepted); results answer a waiting call, by
    `tool_call_id` when given, else by `name`, else in order. Fills each result's id and name from
    the call it answers. `offset`: messages prepended to the row's own (a system prompt)."""
    import json

    declared = [s["function"]["name"] for s in json.loads(tools)] if tools else []
    pending: list[tuple[int, int, dict[str, Any]]] = []  # (message index, call index, call)
    seen_ids: set[str] = set()
    for i, msg in enumerate(messages):
        at = f"{field}[{i - offset}]"
        if msg["role"] == "tool":
            if not pending:
                raise RowError(
                    f"{at} is a tool result, but no tool call is waiting for one; put it right after "
                    "the assistant message whose call it answers"
                )
            match = _answered_call(pending, msg, at)
            _, _, call = pending.pop(match)
            if call["id"] is not None:
                msg["tool_call_id"] = call["id"]
            msg["name"] = call["function"]["name"]
            continue
        if pending:
            _unanswered(pending, field, offset, at)
        for j, call in enumerate(msg.get("tool_calls") or []):
            name = call["function"]["name"]
            if not declared:
                raise RowError(
                    f"{at}.tool_calls[{j}] calls `{name}`, but the row declares no tools; add a `tools` "
                    "column listing each function's JSON schema"
                )
            if name not in declared:
                raise RowError(
                    f"{at}.tool_calls[{j}] calls `{name}`, which `tools` does not declare "
                    f"(declared: {', '.join(declared)}); add its spec to `tools` or correct the name"
                )
            if call["id"] is not None:
                if call["id"] in seen_ids:
                    raise RowError(
                        f"{at}.tool_calls[{j}].id {call['id']!r} is used twice; give each call its own id"
                    )
                seen_ids.add(call["id"])
            pending.append((i, j, call))
    if pending and pending[0][0] != len(messages) - 1:
        _unanswered(pending, field, offset, "the end of the conversation")


def _answered_call(pending: list[tuple[int, int, dict[str, Any]]], msg: dict[str, Any], at: str) -> int:
    """Which waiting call a tool result answers (its index in `pending`)."""
    waiting = ", ".join(
        f"{c['function']['name']}" + (f" (id {c['id']})" if c["id"] else "") for _, _, c in pending
    )
    if (call_id := msg.get("tool_call_id")) is not None:
        for k, (_, _, call) in enumerate(pending):
            if call["id"] == call_id:
                if msg.get("name") not in (None, call["function"]["name"]):
                    raise RowError(
                        f"{at} is named `{msg['name']}` but answers call {call_id!r} of "
                        f"`{call['function']['name']}`; correct the name or the id"
                    )
                return k
        raise RowError(
            f"{at}.tool_call_id is {call_id!r}, which no waiting call has (waiting: {waiting}); "
            "use the id of the call it answers"
        )
    if (name := msg.get("name")) is not None:
        for k, (_, _, call) in enumerate(pending):
            if call["function"]["name"] == name:
                return k
        raise RowError(f"{at} is the result of `{name}`, which no waiting call calls (waiting: {waiting})")
    return 0


def _unanswered(pending: list[tuple[int, int, dict[str, Any]]], field: str, offset: int, before: str) -> None:
    i, j, call = pending[0]
    ident = f", id {call['id']}" if call["id"] else ""
    raise RowError(
        f"{field}[{i - offset}].tool_calls[{j}] (`{call['function']['name']}`{ident}) is not answered "
        f"before {before}; add a tool message with its result right after the call"
        + (f" (`tool_call_id`: {call['id']!r})" if call["id"] else "")
    )


def _json_value(text: Any, where: str, fix: str) -> Any:
    import json

    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RowError(f"{where} is not valid JSON ({exc}); {fix}") from exc


def _json_text(value: Any) -> str:
    import json

    return json.dumps(value, ensure_ascii=False)


def _plain(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Role and content only: TRL's prompt-completion view, which evaluation renders without tools."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _split_implicit(chosen: list[dict[str, str]], rejected: list[dict[str, str]]):
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise RowError(
            "implicit-prompt pair: `chosen` and `rejected` must start with the same prompt messages"
        )
    return chosen[:n], chosen[n:], rejected[n:]


# ---------------------------------------------------------------------------------------------------
# Preference shapes


def _preference_pair(shape: str, data: dict[str, Any]) -> tuple[list, list, list]:
    """(prompt, chosen, rejected) messages of a preference row in any accepted shape."""
    if shape == "preference_explicit":
        return (
            _as_messages(data["prompt"], "prompt", default_role="user"),
            _as_messages(data["chosen"], "chosen", default_role="assistant"),
            _as_messages(data["rejected"], "rejected", default_role="assistant"),
        )
    if shape == "preference_sharegpt":
        prompt = _system(data) + _sharegpt_prompt(data["conversations"])
        return prompt, [_answer(data["chosen"], "chosen")], [_answer(data["rejected"], "rejected")]
    if shape == "preference_alpaca":
        instruction, extra = data["instruction"], data.get("input") or ""
        user = f"{instruction}\n\n{extra}" if isinstance(extra, str) and extra.strip() else instruction
        prompt = _system(data) + _as_messages([{"role": "user", "content": user}], "instruction")
        return prompt, [_answer(data["chosen"], "chosen")], [_answer(data["rejected"], "rejected")]
    if shape == "unpaired_preference":
        raise RowError(
            "an unpaired preference row (`completion` with a `label`, KTO's format): tunegate trains on "
            "paired preferences, and align.method has no `kto` yet; pair each prompt's desirable "
            "(label true) and undesirable (label false) completions into one row "
            "{prompt, chosen, rejected}"
        )
    if shape == "hh_rlhf":
        chosen, rejected = _hh_messages(data["chosen"], "chosen"), _hh_messages(data["rejected"], "rejected")
    else:
        chosen, rejected = _as_messages(data["chosen"], "chosen"), _as_messages(data["rejected"], "rejected")
    return _split_implicit(chosen, rejected)


def _sharegpt_prompt(turns: Any) -> list[dict[str, str]]:
    messages = _sharegpt_messages(turns)
    for i, m in enumerate(messages):
        if m["role"] not in ROLES or m.get("tool_calls"):
            raise RowError(
                f"conversations[{i}] is a tool call or result; preference pairs are trained without tools, "
                "so keep system, human and gpt turns only"
            )
    if messages[-1]["role"] != "user":
        raise RowError(
            "`conversations` (the prompt) must end with a human turn; the answers belong in `chosen` "
            "and `rejected`"
        )
    return messages


def _answer(value: Any, field: str) -> dict[str, str]:
    """LLaMA-Factory's `chosen`/`rejected`: one assistant message ({from, value} or {role, content}) or
    its text."""
    if isinstance(value, dict):
        if "from" in value:
            value = {"role": SHAREGPT_ROLES.get(str(value["from"]).lower()), "content": value.get("value")}
        value = [value]
    message = _as_messages(value, field, default_role="assistant")
    if len(message) != 1 or message[0]["role"] != "assistant":
        raise RowError(f'`{field}` must be one assistant answer, e.g. {{"from": "gpt", "value": "..."}}')
    return message[0]


def _system(data: dict[str, Any]) -> list[dict[str, str]]:
    system = data.get("system")
    return [{"role": "system", "content": system}] if isinstance(system, str) and system.strip() else []


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_EXPECTED = (
    "expected an Anthropic hh-rlhf transcript: turns that alternate '\\n\\nHuman: …' and "
    "'\\n\\nAssistant: …', starting with Human and ending with Assistant"
)


def _hh_messages(text: Any, field: str) -> list[dict[str, str]]:
    """An hh-rlhf transcript as messages; anything else is an error naming what is expected."""
    if not isinstance(text, str):
        raise RowError(f"`{field}` must be a string transcript or a list of messages")
    parts = _HH_TURN.split("\n\n" + text.lstrip())
    if len(parts) < 3 or parts[0].strip():
        raise RowError(
            f"`{field}` is a string without hh-rlhf `Human:`/`Assistant:` markers; {_HH_EXPECTED}, or give "
            "the question in `prompt` and the answers in `chosen`/`rejected`"
        )
    roles, contents = parts[1::2], parts[2::2]
    for i, role in enumerate(roles):
        expected = "Human" if i % 2 == 0 else "Assistant"
        if role != expected:
            raise RowError(f"`{field}` turn {i + 1} is `{role}:` where `{expected}:` belongs; {_HH_EXPECTED}")
    if roles[-1] != "Assistant":
        raise RowError(f"`{field}` ends with a `Human:` turn; {_HH_EXPECTED}")
    messages = [
        {"role": "user" if r == "Human" else "assistant", "content": c.strip()}
        for r, c in zip(roles, contents, strict=True)
    ]
    return _as_messages(messages, field)


_MARKER = re.compile(r"(?:^|\n)[ \t]*(?:Human|Assistant):")


def transcript_markers(shape: str, data: dict[str, Any]) -> list[str]:
    """The text fields of an explicit-prompt row that carry hh-rlhf `Human:`/`Assistant:` markers:
    as strings they train as literal text inside one message."""
    if shape != "preference_explicit":
        return []
    return [
        k
        for k in ("prompt", "chosen", "rejected")
        if isinstance(data.get(k), str) and _MARKER.search(data[k])
    ]


# ---------------------------------------------------------------------------------------------------
# Content parts


_NON_TEXT_PARTS = {  # part type -> (what it is, what is not supported)
    "image_url": ("an image", "images"),
    "image": ("an image", "images"),
    "input_image": ("an image", "images"),
    "input_audio": ("audio", "audio"),
    "audio": ("audio", "audio"),
    "video": ("a video", "videos"),
    "video_url": ("a video", "videos"),
    "file": ("a file", "files"),
}


def content_text(content: Any, where: str) -> Any:
    """OpenAI content parts (`[{"type": "text", "text": …}, …]`) as one text, parts joined by a newline;
    any other value unchanged. Images, audio, video and files are errors: tunegate trains text models."""
    if not (
        isinstance(content, list) and content and all(isinstance(p, dict) and "type" in p for p in content)
    ):
        return content
    texts = []
    for j, part in enumerate(content):
        kind = part["type"]
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in _NON_TEXT_PARTS:
            noun, plural = _NON_TEXT_PARTS[kind]
            raise RowError(
                f"{where}.content[{j}] is {noun} (`{kind}` part): {plural} are not supported for text "
                "models; remove the part (or describe it in text), or train a multimodal model with "
                "another tool"
            )
        else:
            raise RowError(
                f'{where}.content[{j}] must be a text part {{"type": "text", "text": "..."}} '
                f"(got type {kind!r:.40})"
            )
    return "\n".join(texts)


# ---------------------------------------------------------------------------------------------------
# What each shape reads (for the report's column mapping and its ignored columns)

_TOOLS = "tools (when present) → tools"
SHAPE_COLUMNS: dict[tuple[str, str], tuple[tuple[str, ...], str]] = {
    ("sft", "messages"): (("messages", "tools"), f"messages → messages, prompt + completion; {_TOOLS}"),
    ("sft", "sharegpt"): (
        ("conversations", "system", "tools"),
        f"system (when present) → system; conversations (from/value) → messages, prompt + completion; {_TOOLS}",
    ),
    ("sft", "alpaca"): (
        ("instruction", "input", "output", "system"),
        "system (when present) → system; instruction + input → user; output → assistant",
    ),
    ("sft", "prompt_completion"): (
        ("prompt", "completion", "tools"),
        f"prompt → prompt; completion → completion; {_TOOLS}",
    ),
    ("preferences", "preference_explicit"): (
        ("prompt", "chosen", "rejected"),
        "prompt, chosen, rejected as given",
    ),
    ("preferences", "preference_implicit"): (
        ("chosen", "rejected"),
        "shared leading turns → prompt; the rest → chosen, rejected",
    ),
    ("preferences", "preference_sharegpt"): (
        ("conversations", "chosen", "rejected", "system"),
        "system + conversations (from/value) → prompt; chosen, rejected (from/value) → chosen, rejected",
    ),
    ("preferences", "preference_alpaca"): (
        ("instruction", "input", "chosen", "rejected", "system"),
        "system + instruction + input → prompt; chosen, rejected → chosen, rejected",
    ),
    ("preferences", "hh_rlhf"): (
        ("chosen", "rejected"),
        "Human:/Assistant: transcripts split into messages; shared turns → prompt; last answers → chosen, rejected",
    ),
    ("preferences", "unpaired_preference"): (("prompt", "completion", "label"), "refused: unpaired (KTO)"),
    ("prompts", "prompt_only"): (("prompt", *CHECKS), "prompt → prompt; checks → checks"),
    ("prompts", "messages"): (("messages", *CHECKS), "messages → prompt; checks → checks"),
    ("eval", "eval_prompt"): (("prompt", "set", *CHECKS), "prompt → prompt; set and checks as given"),
}
# Columns whose loss changes what a row means, and what is lost.
MEANINGFUL_COLUMNS = {
    "label": "rows train whatever their label says",
    "images": "the model never sees the images: tunegate trains text models",
    "image": "the model never sees the image: tunegate trains text models",
    "tools": "the tool specs are not rendered: this shape has no tool support",
    "history": "earlier turns are left out of the conversation",
    "system": "the system prompt is left out",
}


def columns_read(kind: str, shape: str) -> tuple[str, ...]:
    return SHAPE_COLUMNS.get((kind, shape), ((), ""))[0]


def shape_mapping(kind: str, shape: str) -> str:
    return SHAPE_COLUMNS.get((kind, shape), ((), "as configured"))[1]


def _with_system(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def _text(messages: list[dict[str, Any]]) -> str:
    return "\n".join(
        " ".join(
            [m["content"], *(c["function"]["name"] + c["function"]["arguments"] for c in m["tool_calls"])]
        )
        if m.get("tool_calls")
        else m["content"]
        for m in messages
    )
