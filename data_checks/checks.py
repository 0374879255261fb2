"""Validate one data kind: parse, shape, schema, content (secrets, personal data), then the GX suite
(row count, duplicates, single shape, length) and the loss mask. Every problem is collected, counted
by kind with sample locations, and reported once."""

from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import pandas as pd

from data_checks.formats import RowError, conversation_text, detect_shape, expected_keys, normalise
from data_checks.readers import ReadResult, Row, read_rows
from data_checks.report import DataReport, Finding, Sample
from data_checks.suites import run_suite

SECRETS = {
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "AWS access key": re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),
    "Hugging Face token": re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),
    "OpenAI-style key": re.compile(r"\bsk-[A-Za-z0-9_-]{20,}\b"),
    "Slack token": re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}\b"),
}
PII = {
    "email address": re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b"),
    "phone number": re.compile(r"(?<![\w$])\+?\d{1,3}[ .-]?\(?\d{3}\)?[ .-]?\d{3}[ .-]?\d{4}\b"),
}


@dataclass
class CheckedData:
    report: DataReport
    rows: list[dict[str, Any]]  # normalised, in TRL format, with `_where` and `_n_tokens`


def check_data(
    kind: str,
    spec: str,
    *,
    min_rows: int,
    max_length: int,
    length_policy: str,
    max_duplicate_fraction: float,
    pii_policy: str,
    sample_rows: int = 5,
    tokenizer: Any = None,
    system_prompt: str | None = None,
    shape: str | None = None,
) -> CheckedData:
    """Run every check for one data kind. Never raises for bad data: the report says what failed."""
    read = read_rows(spec)
    report = DataReport(kind=kind, source=str(spec), files=read.files, rows_read=len(read.rows), rows_valid=0)
    _parse_check(report, read, sample_rows)
    valid = _schema_check(report, kind, read.rows, system_prompt, sample_rows, shape)
    _content_checks(report, valid, pii_policy, sample_rows)
    token_counts = _token_counts(kind, valid, tokenizer)
    frame = pd.DataFrame(
        {
            "where": [r.where for r, _ in valid],
            "shape": [shape for _, (shape, _) in valid],
            "norm_hash": [_norm_hash(conversation_text(n)) for _, (_, n) in valid],
            "n_tokens": token_counts if token_counts is not None else [0] * len(valid),
        }
    )
    outcomes = run_suite(
        kind,
        frame,
        min_rows=min_rows,
        max_tokens=max_length if token_counts is not None else None,
        max_duplicate_fraction=max_duplicate_fraction,
    )
    _suite_findings(
        report, outcomes, frame, min_rows, max_length, length_policy, max_duplicate_fraction, sample_rows
    )
    if kind == "sft" and tokenizer is not None and valid:
        _loss_mask_check(report, valid, tokenizer, sample_rows)

    # Without a tokenizer every count is 0, so nothing is dropped.
    drop = (frame["n_tokens"] > max_length) & (length_policy == "drop")
    rows = [
        {**norm, "_where": row.where, "_n_tokens": int(n_tokens)}
        for (row, (_, norm)), n_tokens, dropped in zip(valid, frame["n_tokens"], drop, strict=True)
        if not dropped
    ]
    if drop.any():
        report.dropped["too_long"] = int(drop.sum())
    report.rows_valid = len(rows)
    return CheckedData(report, rows)


def check_leakage(
    report: DataReport, eval_rows: list[dict], train_rows: dict[str, list[dict]], n: int = 5
) -> None:
    """Held-out prompts must not appear (after normalising case and whitespace) in any training data."""
    seen: dict[str, str] = {}
    for rows in train_rows.values():
        for row in rows:
            seen.setdefault(_norm_hash(_last_user(row["prompt"])), row["_where"])
    leaks = [
        Sample(r["_where"], f"also in training at {seen[h]}")
        for r in eval_rows
        if (h := _norm_hash(_last_user(r["prompt"]))) in seen
    ]
    report.add(
        "no train/eval leakage",
        Finding(
            "no train/eval leakage",
            "error",
            len(leaks),
            "held-out prompts also appear in the training data, so the scores would overstate the model",
            "remove those prompts from the training files or from the eval set",
            leaks[:n],
        )
        if leaks
        else None,
    )


def _last_user(messages: list[dict]) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


def _parse_check(report: DataReport, read: ReadResult, n: int) -> None:
    if not read.problems:
        report.add("file parses")
        return
    kinds = Counter(p.what.split(" (")[0] for p in read.problems)
    samples = [
        Sample(f"{p.file}:{p.line}" if p.line else p.file, f"{p.what}: {p.value}".rstrip(": "))
        for p in read.problems[:n]
    ]
    report.add(
        "file parses",
        Finding(
            "file parses",
            "error",
            len(read.problems),
            "unreadable records: " + ", ".join(f"{k} ×{v}" for k, v in kinds.items()),
            "re-export the file as UTF-8 JSON Lines, one complete object per line",
            samples,
        ),
    )


def _schema_check(
    report: DataReport,
    kind: str,
    rows: list[Row],
    system_prompt: str | None,
    n: int,
    forced: str | None = None,
):
    valid: list[tuple[Row, tuple[str, dict]]] = []
    unknown: list[Row] = []
    broken: list[tuple[Row, str]] = []
    for row in rows:
        shape = forced or detect_shape(kind, row.data)
        if shape is None:
            unknown.append(row)
            continue
        try:
            valid.append((row, (shape, normalise(kind, shape, row.data, system_prompt))))
        except RowError as exc:
            broken.append((row, str(exc)))
        except KeyError as exc:
            broken.append((row, f"missing key {exc} for the configured shape {shape!r}"))
    if unknown:
        keys = Counter(", ".join(sorted(r.data)) or "(no keys)" for r in unknown)
        report.add(
            "recognised shape",
            Finding(
                "recognised shape",
                "error",
                len(unknown),
                f"rows match no {kind} format (keys seen: {'; '.join(k for k, _ in keys.most_common(3))})",
                f"give each row {expected_keys(kind)}",
                [Sample(r.where, ", ".join(sorted(r.data))[:80]) for r in unknown[:n]],
            ),
        )
    else:
        report.add("recognised shape")
    if broken:
        by_msg = defaultdict(list)
        for row, msg in broken:
            by_msg[msg].append(row)
        summary = "; ".join(f"{m} (×{len(v)})" for m, v in list(by_msg.items())[:3])
        report.add(
            "schema and roles",
            Finding(
                "schema and roles",
                "error",
                len(broken),
                summary,
                "correct each row as its message says",
                [Sample(r.where, msg) for r, msg in broken[:n]],
            ),
        )
    else:
        report.add("schema and roles")
    return valid


def _content_checks(report: DataReport, valid, pii_policy: str, n: int) -> None:
    secrets, pii = [], []
    for row, (_, norm) in valid:
        text = conversation_text(norm)
        for name, pattern in SECRETS.items():
            if m := pattern.search(text):
                secrets.append(Sample(row.where, f"{name}: {_mask(m.group())}"))
        for name, pattern in PII.items():
            if m := pattern.search(text):
                pii.append(Sample(row.where, f"{name}: {_mask(m.group())}"))
    report.add(
        "no secrets",
        Finding(
            "no secrets",
            "error",
            len(secrets),
            "credentials found in the text (they would be memorised)",
            "remove or redact the credentials, and rotate them: they have been shared",
            secrets[:n],
        )
        if secrets
        else None,
    )
    severity = "error" if pii_policy == "block" else "warning"
    report.add(
        "personal data",
        Finding(
            "personal data",
            severity,
            len(pii),
            "emails or phone numbers in the text",
            "redact them (e.g. <EMAIL>, <PHONE>) or set validate.pii_policy=warn if they are synthetic",
            pii[:n],
        )
        if pii
        else None,
    )


def _token_counts(kind: str, valid, tokenizer) -> list[int] | None:
    if tokenizer is None or not valid:
        return None
    texts = []
    for _, (_, norm) in valid:
        msgs = norm["prompt"] + norm.get("completion", norm.get("chosen", []))
        texts.append(tokenizer.apply_chat_template(msgs, tokenize=False))
        if kind == "preferences":  # the longer side decides
            alt = tokenizer.apply_chat_template(norm["prompt"] + norm["rejected"], tokenize=False)
            texts[-1] = max(texts[-1], alt, key=len)
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [len(ids) for ids in enc]


def _suite_findings(report, outcomes, frame, min_rows, max_length, length_policy, max_dup, n) -> None:
    o = outcomes["min_rows"]
    report.add(
        "enough rows",
        None
        if o.success
        else Finding(
            "enough rows",
            "error",
            len(frame),
            f"{len(frame)} valid rows, at least {min_rows} required",
            "add more examples, or lower validate.min_rows for this kind",
        ),
    )
    o = outcomes["single_shape"]
    if o.success:
        report.add("one shape per split")
    else:
        counts = frame["shape"].value_counts()
        minority = frame[frame["shape"] != counts.index[0]]
        report.add(
            "one shape per split",
            Finding(
                "one shape per split",
                "error",
                len(minority),
                "mixed shapes: " + ", ".join(f"{s} ×{c}" for s, c in counts.items()),
                f"convert every row to one shape ({counts.index[0]})",
                [Sample(w, s) for w, s in zip(minority["where"][:n], minority["shape"][:n], strict=True)],
            ),
        )
    dup_mask = frame.duplicated("norm_hash", keep="first")
    n_dup = int(dup_mask.sum())
    if n_dup:
        first = frame.drop_duplicates("norm_hash").set_index("norm_hash")["where"]
        samples = [
            Sample(w, f"duplicate of {first[h]}")
            for w, h in zip(frame["where"][dup_mask][:n], frame["norm_hash"][dup_mask][:n], strict=True)
        ]
        o = outcomes["duplicates"]
        report.add(
            "duplicates",
            Finding(
                "duplicates",
                "warning" if o.success else "error",
                n_dup,
                f"{n_dup} rows repeat another (after normalising case and whitespace); "
                f"{'within' if o.success else 'above'} the {max_dup:.0%} limit",
                "remove the repeats (the build stage drops them), or raise validate.max_duplicate_fraction",
                samples,
            ),
        )
    else:
        report.add("duplicates")
    if "length" in outcomes:
        o = outcomes["length"]
        too_long = frame[frame["n_tokens"] > max_length]
        report.add(
            "length",
            None
            if o.success
            else Finding(
                "length",
                "error" if length_policy == "fail" else "warning",
                o.unexpected_count,
                f"rendered examples longer than validate.max_length={max_length} tokens"
                + (" (dropped)" if length_policy == "drop" else ""),
                "shorten them, raise validate.max_length, or set validate.length_policy=drop",
                [
                    Sample(w, f"{t} tokens")
                    for w, t in zip(too_long["where"][:n], too_long["n_tokens"][:n], strict=True)
                ],
            ),
        )


def _loss_mask_check(report: DataReport, valid, tokenizer, n: int) -> None:
    """The tokens an SFT row trains on are the completion's: they must exist and include end-of-turn."""
    empty = []
    eos = tokenizer.eos_token
    _, (_, first) = valid[0]
    full = tokenizer.apply_chat_template(first["prompt"] + first["completion"], tokenize=False)
    answer = first["completion"][-1]["content"]
    tail = full[full.rfind(answer) + len(answer) :] if answer in full else ""
    if eos and eos not in tail:
        report.add(
            "loss mask",
            Finding(
                "loss mask",
                "error",
                len(valid),
                f"the chat template drops the end-of-turn token {eos!r} after the assistant's answer, so the "
                "model would never learn to stop",
                "use a chat template that closes assistant turns with the EOS token",
                [Sample(valid[0][0].where, repr(full[-60:]))],
            ),
        )
        return
    # Schema checks already guarantee non-empty answers; rendering a spread sample catches templates
    # that still mask them out, without tokenizing a million rows twice.
    step = max(1, len(valid) // 256)
    for row, (_, norm) in valid[::step]:
        prompt_ids = tokenizer.apply_chat_template(norm["prompt"], add_generation_prompt=True, tokenize=True)
        full_ids = tokenizer.apply_chat_template(norm["prompt"] + norm["completion"], tokenize=True)
        if hasattr(prompt_ids, "input_ids"):
            prompt_ids, full_ids = prompt_ids["input_ids"], full_ids["input_ids"]
        if len(full_ids) <= len(prompt_ids):
            empty.append(Sample(row.where, "no trainable tokens"))
        if len(empty) >= n:
            break
    report.add(
        "loss mask",
        Finding(
            "loss mask",
            "error",
            len(empty),
            "examples with nothing to train on after masking the prompt",
            "give each example a non-empty assistant answer",
            empty,
        )
        if empty
        else None,
    )


def _norm_hash(text: str) -> str:
    return hashlib.sha1(" ".join(text.lower().split()).encode()).hexdigest()


def _mask(secret: str) -> str:
    return secret[:4] + "…" + f"({len(secret)} chars)"
