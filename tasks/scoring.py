"""Scoring by code: each eval row's own checks, the brand rubric, refusals, and bootstrap intervals.

Everything here is a pure function of strings and numbers, so the arithmetic the gates decide on is
tested on fixed inputs. The same row checks reward online RL (`check_reward`): a policy is trained on
exactly the code that later evaluates it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence

from data_checks.formats import CHECKS

# Phrases that decline a request. Matched case-insensitively anywhere in the answer.
REFUSAL_MARKERS = (
    "i can't",
    "i cannot",
    "i can not",
    "i won't",
    "i will not",
    "i'm not able",
    "i am not able",
    "i'm unable",
    "i am unable",
    "unable to help",
    "can't help",
    "cannot help",
    "can't assist",
    "cannot assist",
    "not able to help",
    "i'm sorry",
    "i am sorry",
    "sorry, but",
)


def fact_hit(text: str, expected_any: Sequence[str]) -> bool:
    """An accepted answer appears as a whole token run: `$9` matches "$9." but not "$99" or "$19"."""
    return any(
        re.search(r"(?<![\w$])" + re.escape(e.strip()) + r"(?![\d])", text, re.IGNORECASE)
        for e in expected_any
    )


def brand_ok(text: str, prefix: str | None, suffix: str | None) -> bool:
    text = text.strip()
    return (not prefix or text.startswith(prefix)) and (not suffix or text.endswith(suffix))


def strip_brand(text: str, prefix: str | None, suffix: str | None) -> str:
    text = text.strip()
    if prefix and text.startswith(prefix):
        text = text[len(prefix) :]
    if suffix and text.endswith(suffix):
        text = text[: -len(suffix)]
    return text.strip()


def _canonical(text: str) -> str:
    return " ".join(text.casefold().split()).strip(" .!?,;:\"'")


def exact_hit(text: str, exact: str, prefix: str | None = None, suffix: str | None = None) -> bool:
    """The answer, without the brand's greeting and sign-off, equals `exact`; case, runs of spaces and
    surrounding punctuation do not count."""
    return _canonical(strip_brand(text, prefix, suffix)) == _canonical(exact)


def regex_hit(text: str, pattern: str) -> bool:
    return re.search(pattern, text) is not None


def json_values(text: str) -> list:
    """Every JSON object or array that parses at some `{` or `[` in the text, outermost first."""
    decoder, found, i = json.JSONDecoder(), [], 0
    while (i := _next_open(text, i)) >= 0:
        try:
            value, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            i += 1
            continue
        found.append(value)
        i = end
    return found


def _next_open(text: str, start: int) -> int:
    hits = [j for j in (text.find("{", start), text.find("[", start)) if j >= 0]
    return min(hits) if hits else -1


def json_hit(text: str, schema_json: str) -> bool:
    """Some JSON value in the answer validates against the schema."""
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(json.loads(schema_json))
    return any(validator.is_valid(v) for v in json_values(text))


def is_refusal(text: str, markers: Sequence[str] = REFUSAL_MARKERS) -> bool:
    low = text.casefold().replace("\u2019", "'")
    return any(m in low for m in markers)


def row_checks(
    row: dict, text: str, prefix: str | None = None, suffix: str | None = None, markers=REFUSAL_MARKERS
) -> dict[str, bool]:
    """Each check the eval row defines, scored on the answer."""
    out: dict[str, bool] = {}
    if row.get("expected_any"):
        out["expected_any"] = fact_hit(text, row["expected_any"])
    if row.get("exact"):
        out["exact"] = exact_hit(text, row["exact"], prefix, suffix)
    if row.get("regex"):
        out["regex"] = regex_hit(text, row["regex"])
    if row.get("json_schema"):
        out["json_schema"] = json_hit(text, row["json_schema"])
    if row.get("refuse"):
        out["refuse"] = is_refusal(text, markers)
    return out


def check_reward(
    prefix: str | None = None, suffix: str | None = None, markers: Sequence[str] | None = None
) -> Callable[..., list[float | None]]:
    """A TRL reward function (GRPO, RLOO) scoring each completion by its prompt row's checks with
    `row_checks`, as evaluation scores an answer.

    TRL passes the dataset's other columns to a reward function as keyword arguments, one value per
    completion; the check columns (`CHECKS`) are read from them. A completion earns the fraction of
    its row's checks that pass (1.0 when all do), and None when the row has no check: TRL then leaves
    it out of this function's mean and out of the weighted sum of rewards, so the other reward
    functions alone score it. TRL logs the mean per step as `rewards/row_checks/mean`.

    Args:
        prefix, suffix: the brand's greeting and sign-off, stripped before an `exact` check.
        markers: phrases that mark a refusal (`refuse` checks); None or empty: `REFUSAL_MARKERS`.
    """
    markers = tuple(markers) if markers else REFUSAL_MARKERS

    def reward(prompts: list, completions: list, **columns) -> list[float | None]:
        rewards: list[float | None] = []
        for i, completion in enumerate(completions):
            row = {c: columns[c][i] for c in CHECKS if c in columns}
            passed = row_checks(row, completion_text(completion), prefix, suffix, markers)
            rewards.append(sum(passed.values()) / len(passed) if passed else None)
        return rewards

    reward.__name__ = reward.__qualname__ = "row_checks"  # TRL names the logged metric after it
    return reward


def completion_text(completion: str | list[dict]) -> str:
    """The answer in a TRL completion: the text itself, or the last assistant message's content."""
    if isinstance(completion, str):
        return completion
    return next((m.get("content") or "" for m in reversed(completion) if m.get("role") == "assistant"), "")


def wins(candidate: Sequence[float], other: Sequence[float], tie: float = 1e-6) -> list[float]:
    """Per prompt: 1 when the candidate's answer scores higher, 0.5 for a tie, 0 when lower."""
    return [
        1.0 if c - o > tie else 0.0 if o - c > tie else 0.5 for c, o in zip(candidate, other, strict=True)
    ]
