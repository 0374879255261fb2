"""Validate one data kind: parse, shape, schema, content (secrets, personal data), meaning (ignored
columns, transcript markers), length with the real chat template, then the expectation suite over the
kept rows (row count, duplicates, single shape, length; suites.py), the dropped-rows gate and the loss
mask.

Files are streamed in chunks. Each chunk is checked on its own (in worker processes for large inputs):
it comes back as a few numeric columns per row, bounded samples of every problem, and the valid rows
already normalised to TRL's format as JSON Lines. Only those columns are kept for the whole file, so a
million-row file validates in a few hundred MiB.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data_checks.formats import (
    MEANINGFUL_COLUMNS,
    RowError,
    columns_read,
    conversation_text,
    detect_shape,
    expected_keys,
    normalise,
    shape_mapping,
    transcript_markers,
)
from data_checks.masks import (
    MaskError,
    assistant_mask,
    chat_messages,
    chat_tools,
    show_mask,
    tool_template_problem,
)
from data_checks.readers import (
    Chunk,
    ParseProblem,
    Source,
    describe_format,
    input_bytes,
    iter_chunks,
    location,
    no_files_problem,
    parse_chunk,
    resolve_sources,
)
from data_checks.report import DataReport, Finding, Sample, SourceInfo
from data_checks.suites import run_suite

# name -> (literal hints, pattern): the pattern only runs on text containing a hint.
SECRETS = {
    "private key": (("PRIVATE KEY-----",), re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")),
    "AWS access key": (("AKIA",), re.compile(r"\bAKIA[0-9A-Z]{16}\b")),
    "GitHub token": (("ghp_", "gho_", "ghu_", "ghs_", "ghr_"), re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b")),
    "Hugging Face token": (("hf_",), re.compile(r"\bhf_[A-Za-z0-9]{30,}\b")),
    "OpenAI-style key": (("sk-",), re.compile(r"\bsk-[A-Za-z0-9_-]{20,}\b")),
    "Slack token": (("xox",), re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}\b")),
}
PII = {
    "email address": re.compile(r"\b[A-Za-z0-9._%+-]+@([A-Za-z0-9.-]+\.[A-Za-z]{2,})\b"),
    # A written phone number: groups 3-3-4 with separators (optionally a country code and an area code
    # in parentheses), or E.164 (+ and 10-14 digits). Never digits inside a longer number, a decimal
    # (0.3571428571), an amount or an identifier, and never a bare run of digits (ids, timestamps).
    "phone number": re.compile(
        r"(?<![\w$.,+/:-])"
        r"(?:(?:\+\d{1,3}[ .-]?)?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}|\+[1-9]\d{9,13})"
        r"(?![\w]|[.,-]\d)"
    ),
}
# Reserved for documentation and tests (RFC 2606, RFC 6761): never someone's address.
RESERVED_DOMAINS = ("example.com", "example.org", "example.net")
RESERVED_TLDS = ("test", "invalid", "example", "localhost")
_FOUR_DIGITS = re.compile(r"\d{4}")
PARALLEL_ABOVE_BYTES = 16 * 2**20  # smaller inputs are checked in-process: workers cost seconds to start
MASK_SAMPLES = 256


@dataclass
class CheckSettings:
    """What checking a chunk needs; picklable, so each worker process receives it once."""

    kind: str
    shape: str | None
    system_prompt: str | None
    tokenizer: Any
    max_length: int
    drop_long: bool
    sample_rows: int


@dataclass
class Tally:
    """Offending rows of one check: the count, the first few locations, and counts by cause."""

    count: int = 0
    samples: list[Sample] = field(default_factory=list)
    causes: Counter = field(default_factory=Counter)
    fixes: dict[str, str] = field(default_factory=dict)  # cause -> its fix, where causes differ in fix

    def add(self, sample: Sample, limit: int, cause: str | None = None, fix: str | None = None) -> None:
        self.count += 1
        if len(self.samples) < limit:
            self.samples.append(sample)
        if cause is not None:
            self.causes[cause] += 1
            if fix is not None:
                self.fixes.setdefault(cause, fix)

    def merge(self, other: Tally, limit: int) -> None:
        self.count += other.count
        self.samples.extend(other.samples[: max(0, limit - len(self.samples))])
        self.causes.update(other.causes)
        for cause, fix in other.fixes.items():
            self.fixes.setdefault(cause, fix)


# markers: hh-rlhf `Human:`/`Assistant:` text in TRL's string form; columns: ignored columns that
# change what a row means (label, images, tools where the shape has none).
TALLIES = ("parse", "shape", "schema", "secrets", "pii", "markers", "columns")


@dataclass
class ChunkResult:
    file: str
    rows_read: int
    tallies: dict[str, Tally]
    columns: dict[str, np.ndarray]  # per valid row: line, norm_hash, exact_hash, prompt_hash, n_tokens, kept
    shapes: list[str]
    kept_jsonl: bytes  # valid rows kept, normalised, one JSON object per line
    dropped_jsonl: bytes  # rows dropped by policy: {"where", "reason"}
    mask_sample: list[tuple[str, dict]]
    detected: Counter = field(default_factory=Counter)  # shape -> rows detected as it (valid or not)
    ignored: Counter = field(default_factory=Counter)  # column no shape reads -> rows that fill it
    meta: dict[str, str] = field(default_factory=dict)  # what reading learnt (a Hub revision)


@dataclass
class CheckedData:
    report: DataReport
    frame: pd.DataFrame  # per valid row: file, line, shape, norm/exact/prompt hashes, n_tokens, kept
    path: Path | None = None  # the kept rows in TRL format (with `_where`, `_n_tokens`, `_hash`)

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The kept rows, read back (for small data: tests and previews)."""
        if self.path is None:
            raise ValueError("the rows were not kept: pass out_path to check_data")
        with open(self.path, encoding="utf-8") as f:
            return [json.loads(line) for line in f]


def check_data(
    kind: str,
    spec: str | list[str],
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
    out_path: str | Path | None = None,
    workers: int = 0,
    train_on: str = "all_assistant",
    max_dropped_fraction: float = 1.0,
    suite_engine: str = "gx",
) -> CheckedData:
    """Run every check for one data kind. Never raises for bad data: the report says what failed.

    `train_on` (`sft.train_on`) decides which assistant turns the SFT loss-mask check marks.

    With `out_path`, the kept rows are written there in TRL format and the rows dropped by policy, with
    their reasons, beside it (`<name>.dropped.jsonl`). `workers=0` picks one process per core for
    inputs over 16 MiB. Row counts, `min_rows` and the suite judge the rows kept after policy drops;
    `max_dropped_fraction` fails the data when policies drop more than that share of the rows read.
    `suite_engine` evaluates the expectation suite with Great Expectations (`gx`) or pandas (suites.py).
    """
    sources = resolve_sources(spec)
    source = ", ".join(map(str, spec)) if isinstance(spec, list | tuple) else str(spec)
    report = DataReport(kind=kind, source=source, files=[str(s) for s in sources], rows_read=0, rows_valid=0)
    settings = CheckSettings(
        kind, shape, system_prompt, tokenizer, max_length, length_policy == "drop", sample_rows
    )
    if workers <= 0:
        big = sources and input_bytes(sources) > PARALLEL_ABOVE_BYTES
        workers = min(os.cpu_count() or 1, 8) if big else 1
    acc = _Accumulator(sample_rows)
    if not sources:
        _add_problem(acc.tallies["parse"], no_files_problem(source), sample_rows)
    out = Path(out_path) if out_path is not None else None
    with _Outputs(out) as sink:
        for result in _check_chunks(iter_chunks(sources), settings, workers):
            acc.add(result)
            sink.write(result)
    frame = acc.frame()
    kept = frame[frame["kept"]]
    report.rows_read = acc.rows_read
    report.rows_valid = len(kept)
    report.sources = acc.sources(kind, sources)
    report.files = [s.file for s in report.sources]
    if len(kept) < len(frame):
        report.dropped["too_long"] = len(frame) - len(kept)

    _parse_finding(report, acc.tallies["parse"])
    _schema_findings(report, kind, acc.tallies["shape"], acc.tallies["schema"])
    _content_findings(report, acc.tallies["secrets"], acc.tallies["pii"], pii_policy)
    _meaning_findings(report, acc.tallies["markers"], acc.tallies["columns"], report.sources)
    counted = tokenizer is not None
    outcomes = run_suite(
        kind,
        kept,
        min_rows=min_rows,
        max_tokens=max_length if counted and length_policy == "fail" else None,
        max_duplicate_fraction=max_duplicate_fraction,
        engine=suite_engine,
    )
    _suite_findings(
        report, outcomes, frame, min_rows, max_length, length_policy, max_duplicate_fraction, sample_rows
    )
    _dropped_finding(report, frame, max_dropped_fraction, max_length, sample_rows)
    if kind == "sft" and counted and acc.mask_sample:
        _loss_mask_check(report, acc.mask_sample, len(frame), tokenizer, sample_rows, train_on)
    return CheckedData(report, frame, out)


def check_leakage(
    report: DataReport, eval_data: CheckedData, train: dict[str, CheckedData], n: int = 5
) -> None:
    """Held-out prompts must not appear (after normalising case and whitespace) in any training data."""
    frames = [c.frame for c in train.values() if len(c.frame)]
    leaks: list[Sample] = []
    count = 0
    if frames and len(eval_data.frame):
        seen = pd.concat([f[["file", "line", "prompt_hash"]].astype({"file": str}) for f in frames])
        seen = seen.drop_duplicates("prompt_hash").set_index("prompt_hash")
        hits = eval_data.frame[eval_data.frame["prompt_hash"].isin(seen.index)]
        count = len(hits)
        for row in hits.head(n).itertuples():
            first = seen.loc[row.prompt_hash]
            also = location(first.file, first.line)
            leaks.append(Sample(location(row.file, row.line), f"also in training at {also}"))
    report.add(
        "no train/eval leakage",
        Finding(
            "no train/eval leakage",
            "error",
            count,
            "held-out prompts also appear in the training data, so the scores would overstate the model",
            "remove those prompts from the training files or from the eval set",
            leaks,
        )
        if count
        else None,
    )


# ---------------------------------------------------------------------------------------------------
# One chunk


def _check_chunk(s: CheckSettings, chunk: Chunk) -> ChunkResult:
    n = s.sample_rows
    tallies = {name: Tally() for name in TALLIES}
    rows, problems = parse_chunk(chunk)
    for p in problems:
        _add_problem(tallies["parse"], p, n)

    valid: list[tuple[Any, str, dict]] = []  # (row, shape, normalised)
    detected: Counter = Counter()
    ignored: Counter = Counter()
    for row in rows:
        shape = s.shape or detect_shape(s.kind, row.data)
        if shape is None:
            keys = ", ".join(sorted(row.data)) or "(no keys)"
            tallies["shape"].add(Sample(row.where, keys[:80]), n, keys)
            continue
        detected[shape] += 1
        _ignored_columns(s.kind, shape, row, ignored, tallies["columns"], n)
        if fields := transcript_markers(shape, row.data):
            marked = ", ".join(f"`{f}`" for f in fields)
            verb = "holds" if len(fields) == 1 else "hold"
            tallies["markers"].add(Sample(row.where, f"{marked} {verb} Human:/Assistant: markers"), n)
        try:
            valid.append((row, shape, normalise(s.kind, shape, row.data, s.system_prompt)))
        except RowError as exc:
            tallies["schema"].add(Sample(row.where, str(exc)), n, str(exc))
        except KeyError as exc:
            msg = f"missing key {exc} for the configured shape {shape!r}"
            tallies["schema"].add(Sample(row.where, msg), n, msg)

    if s.kind == "sft" and s.tokenizer is not None and any("tools" in norm for _, _, norm in valid):
        if (problem := tool_template_problem(s.tokenizer)) is not None:  # tool rows cannot render
            for row, _, norm in valid:
                if "tools" in norm:
                    tallies["schema"].add(Sample(row.where, problem), n, problem)
            valid = [v for v in valid if "tools" not in v[2]]

    n_tokens = [0] * len(valid)
    if s.tokenizer is not None and valid:
        counts = _token_counts(s.kind, [norm for _, _, norm in valid], s.tokenizer)
        for (row, _, _), c in zip(valid, counts, strict=True):
            if isinstance(c, str):
                msg = f"the chat template rejects this conversation ({c})"
                tallies["schema"].add(
                    Sample(row.where, msg), n, "the chat template rejects some conversations"
                )
        keep = [not isinstance(c, str) for c in counts]
        valid = [v for v, k in zip(valid, keep, strict=True) if k]
        n_tokens = [c for c, k in zip(counts, keep, strict=True) if k]

    lines, norm_hashes, exact_hashes, prompt_hashes, kept = [], [], [], [], []
    out, dropped = [], []
    for (row, _, norm), tokens in zip(valid, n_tokens, strict=True):
        text = conversation_text(norm)
        _scan(text, row.where, tallies, n)
        h = _norm_hash(text)
        lines.append(row.line)
        norm_hashes.append(h)
        exact_hashes.append(_hash(text))
        prompt_hashes.append(_norm_hash(_last_user(norm["prompt"])))
        keep = not (s.drop_long and tokens > s.max_length)
        kept.append(keep)
        if keep:
            record = {**norm, "_where": row.where, "_n_tokens": tokens, "_hash": h}
            out.append(json.dumps(record, ensure_ascii=False, sort_keys=True))
        else:
            reason = f"too long: {tokens} tokens > validate.max_length={s.max_length}"
            dropped.append(json.dumps({"where": row.where, "reason": reason}, ensure_ascii=False))
    return ChunkResult(
        file=chunk.file,
        rows_read=len(rows),
        tallies=tallies,
        columns={
            "line": np.asarray(lines, dtype=np.int64),
            "norm_hash": np.asarray(norm_hashes, dtype=np.int64),
            "exact_hash": np.asarray(exact_hashes, dtype=np.int64),
            "prompt_hash": np.asarray(prompt_hashes, dtype=np.int64),
            "n_tokens": np.asarray(n_tokens, dtype=np.int32),
            "kept": np.asarray(kept, dtype=bool),
        },
        shapes=[shape for _, shape, _ in valid],
        kept_jsonl="".join(line + "\n" for line in out).encode("utf-8"),
        dropped_jsonl="".join(line + "\n" for line in dropped).encode("utf-8"),
        mask_sample=[(valid[0][0].where, valid[0][2])] if valid else [],
        detected=detected,
        ignored=ignored,
        meta=chunk.meta,
    )


def _add_problem(tally: Tally, p: ParseProblem, n: int) -> None:
    tally.add(Sample(p.where, f"{p.what}: {p.value}".rstrip(": ")), n, p.what.split(" (")[0], p.fix)


def _ignored_columns(kind: str, shape: str, row, ignored: Counter, tally: Tally, n: int) -> None:
    """Count the filled columns the row's shape does not read; tally those whose loss changes meaning."""
    read = columns_read(kind, shape)
    for column, value in row.data.items():
        if column in read or value is None or value == "" or value == [] or value == {}:
            continue
        ignored[column] += 1
        if column in MEANINGFUL_COLUMNS:
            tally.add(Sample(row.where, f"`{column}` ignored: {MEANINGFUL_COLUMNS[column]}"), n, column)


def _scan(text: str, where: str, tallies: dict[str, Tally], n: int) -> None:
    for name, (hints, pattern) in SECRETS.items():
        if any(h in text for h in hints) and (m := pattern.search(text)):
            tallies["secrets"].add(Sample(where, f"{name}: {_mask(m.group())}"), n, name)
    if "@" in text:
        for m in PII["email address"].finditer(text):
            if not _reserved_domain(m.group(1)):
                tallies["pii"].add(Sample(where, f"email address: {_mask(m.group())}"), n, "email address")
                break
    if _FOUR_DIGITS.search(text):
        for m in PII["phone number"].finditer(text):
            if re.sub(r"\D", "", m.group())[-7:-2] != "55501":  # 555-0100..0199: reserved for fiction
                tallies["pii"].add(Sample(where, f"phone number: {_mask(m.group())}"), n, "phone number")
                break


def _reserved_domain(domain: str) -> bool:
    domain = domain.lower()
    return (
        domain in RESERVED_DOMAINS
        or domain.endswith(tuple("." + d for d in RESERVED_DOMAINS))
        or domain.rsplit(".", 1)[-1] in RESERVED_TLDS
    )


def _token_counts(kind: str, norms: list[dict], tokenizer) -> list[int | str]:
    """Tokens of each row as the trainer renders it (the real chat template); for a preference pair the
    longer side. A row the template refuses gets the template's message instead of a count."""
    if kind in ("prompts", "eval"):
        return _render_count(tokenizer, [norm["prompt"] for norm in norms], generation_prompt=True)
    if kind == "sft":  # the whole conversation as SFT trains on it, tool specs included
        conversations = [chat_messages(norm["messages"]) for norm in norms]
        return _render_count(tokenizer, conversations, tools=[chat_tools(n.get("tools")) for n in norms])
    answers = [norm["prompt"] + norm.get("completion", norm.get("chosen", [])) for norm in norms]
    counts = _render_count(tokenizer, answers)
    if kind == "preferences":
        other = _render_count(tokenizer, [norm["prompt"] + norm["rejected"] for norm in norms])
        counts = [
            a if isinstance(a, str) else b if isinstance(b, str) else max(a, b)
            for a, b in zip(counts, other, strict=True)
        ]
    return counts


def _render_count(
    tokenizer,
    conversations: list[list[dict]],
    generation_prompt: bool = False,
    tools: list[list[dict] | None] | None = None,
) -> list[int | str]:
    tools = tools or [None] * len(conversations)
    try:
        if any(tools):  # each row its own tools: rendered row by row below
            raise ValueError("per-row tools")
        texts: list[str | None] = tokenizer.apply_chat_template(
            conversations, tokenize=False, add_generation_prompt=generation_prompt
        )
        errors: dict[int, str] = {}
    except Exception:  # noqa: BLE001 - one bad conversation fails the batch: find it row by row
        texts, errors = [], {}
        for i, conv in enumerate(conversations):
            try:
                texts.append(
                    tokenizer.apply_chat_template(
                        conv, tools=tools[i], tokenize=False, add_generation_prompt=generation_prompt
                    )
                )
            except Exception as exc:  # noqa: BLE001 - the template's own message is the finding
                texts.append(None)
                errors[i] = f"{type(exc).__name__}: {exc}"[:120]
    ok = [t for t in texts if t is not None]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        lengths = iter(len(e) for e in backend.encode_batch(ok, add_special_tokens=False))
    else:
        lengths = iter(len(ids) for ids in tokenizer(ok, add_special_tokens=False)["input_ids"])
    return [errors[i] if t is None else next(lengths) for i, t in enumerate(texts)]


# ---------------------------------------------------------------------------------------------------
# Many chunks

_WORKER: CheckSettings | None = None


def _init_worker(settings: CheckSettings) -> None:
    global _WORKER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    _WORKER = settings


def _check_in_worker(chunk: Chunk) -> ChunkResult:
    assert _WORKER is not None
    return _check_chunk(_WORKER, chunk)


def _check_chunks(chunks: Iterable[Chunk], settings: CheckSettings, workers: int) -> Iterator[ChunkResult]:
    """Results in input order; at most two chunks per worker in flight, so memory stays flat."""
    if workers <= 1:
        for chunk in chunks:
            yield _check_chunk(settings, chunk)
        return
    # spawn, not fork: the caller may be a multi-threaded Prefect worker.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(settings,)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.submit(_check_in_worker, chunk))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@dataclass
class _FileTally:
    rows: int = 0
    shapes: Counter = field(default_factory=Counter)  # detected shape -> rows
    ignored: Counter = field(default_factory=Counter)  # unread column -> rows that fill it
    meta: dict[str, str] = field(default_factory=dict)


class _Accumulator:
    def __init__(self, n: int) -> None:
        self.n = n
        self.rows_read = 0
        self.tallies = {name: Tally() for name in TALLIES}
        self.files: list[str] = []
        self.columns: dict[str, list[np.ndarray]] = {}
        self.shapes: list[np.ndarray] = []
        self.file_codes: list[np.ndarray] = []
        self.mask_sample: list[tuple[str, dict]] = []
        self.per_file: dict[str, _FileTally] = {}

    def add(self, r: ChunkResult) -> None:
        self.rows_read += r.rows_read
        for name, tally in r.tallies.items():
            self.tallies[name].merge(tally, self.n)
        if r.file not in self.files:
            self.files.append(r.file)
        info = self.per_file.setdefault(r.file, _FileTally())
        info.rows += r.rows_read
        info.shapes.update(r.detected)
        info.ignored.update(r.ignored)
        info.meta.update(r.meta)
        for key, values in r.columns.items():
            self.columns.setdefault(key, []).append(values)
        self.shapes.append(np.asarray(r.shapes, dtype=object))
        self.file_codes.append(np.full(len(r.shapes), self.files.index(r.file), dtype=np.int32))
        if len(self.mask_sample) < MASK_SAMPLES:
            self.mask_sample.extend(r.mask_sample)

    def sources(self, kind: str, sources: list[Source]) -> list[SourceInfo]:
        """What each source turned out to be: format, detected shapes and their mapping, ignored columns."""
        read_as = {info.meta.get("source", f): f for f, info in self.per_file.items()}  # Hub: resolved
        out = []
        for source in sources:
            file = read_as.get(str(source), str(source))
            info = self.per_file.get(file, _FileTally())
            shapes = dict(info.shapes.most_common())
            out.append(
                SourceInfo(
                    file=file,
                    format=describe_format(source),
                    rows=info.rows,
                    shapes=shapes,
                    mapping={shape: shape_mapping(kind, shape) for shape in shapes},
                    ignored=dict(info.ignored.most_common()),
                    revision=info.meta.get("revision"),
                    sha256=info.meta.get("sha256"),
                )
            )
        return out

    def frame(self) -> pd.DataFrame:
        def cat(parts, dtype):
            return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

        codes = cat(self.file_codes, np.int32)
        frame = pd.DataFrame(
            {
                "file": pd.Categorical.from_codes(codes, categories=self.files or ["-"]),
                "line": cat(self.columns.get("line", []), np.int64),
                "shape": pd.Categorical(cat(self.shapes, object)),
                "norm_hash": cat(self.columns.get("norm_hash", []), np.int64),
                "exact_hash": cat(self.columns.get("exact_hash", []), np.int64),
                "prompt_hash": cat(self.columns.get("prompt_hash", []), np.int64),
                "n_tokens": cat(self.columns.get("n_tokens", []), np.int32),
                "kept": cat(self.columns.get("kept", []), bool),
            }
        )
        return frame


class _Outputs:
    """Kept rows to `path`, dropped rows to `<stem>.dropped.jsonl`; both appear whole or not at all."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.files: list = []

    def __enter__(self) -> _Outputs:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.targets = [self.path, dropped_path(self.path)]
            self.files = [open(t.with_name(t.name + ".tmp"), "wb") for t in self.targets]
        return self

    def write(self, r: ChunkResult) -> None:
        if self.files:
            self.files[0].write(r.kept_jsonl)
            self.files[1].write(r.dropped_jsonl)

    def __exit__(self, exc_type, *_) -> None:
        for f in self.files:
            f.close()
        for f, target in zip(self.files, getattr(self, "targets", []), strict=False):
            tmp = Path(f.name)
            if exc_type is None:
                tmp.replace(target)
            else:
                tmp.unlink(missing_ok=True)


def dropped_path(path: Path) -> Path:
    return path.with_name(path.name.removesuffix(".jsonl") + ".dropped.jsonl")


# ---------------------------------------------------------------------------------------------------
# Findings


def _add(
    report: DataReport, check: str, tally: Tally, message: str, fix: str, severity: str = "error"
) -> None:
    """One check's verdict from its tally: pass when nothing offended, else a finding with samples."""
    finding = Finding(check, severity, tally.count, message, fix, tally.samples) if tally.count else None
    report.add(check, finding)


def _parse_finding(report: DataReport, tally: Tally) -> None:
    fixes = dict.fromkeys(tally.fixes.get(cause, "") for cause in tally.causes)  # in order, each once
    _add(
        report,
        "file parses",
        tally,
        "unreadable records: " + ", ".join(f"{k} ×{v}" for k, v in tally.causes.items()),
        "; ".join(f for f in fixes if f)
        or "re-export the file as UTF-8 JSON Lines, one complete object per line",
    )


def _schema_findings(report: DataReport, kind: str, unknown: Tally, broken: Tally) -> None:
    keys = "; ".join(k for k, _ in unknown.causes.most_common(3))
    _add(
        report,
        "recognised shape",
        unknown,
        f"rows match no {kind} format (keys seen: {keys})",
        f"give each row {expected_keys(kind)}",
    )
    _add(
        report,
        "schema and roles",
        broken,
        "; ".join(f"{m} (×{c})" for m, c in list(broken.causes.items())[:3]),
        "correct each row as its message says",
    )


def _content_findings(report: DataReport, secrets: Tally, pii: Tally, pii_policy: str) -> None:
    _add(
        report,
        "no secrets",
        secrets,
        "credentials found in the text (they would be memorised)",
        "remove or redact the credentials, and rotate them: they have been shared",
    )
    _add(
        report,
        "personal data",
        pii,
        "emails or phone numbers in the text",
        "redact them (e.g. <EMAIL>, <PHONE>), or set validate.pii_policy=warn if they are synthetic"
        if pii_policy == "block"
        else "redact them (e.g. <EMAIL>, <PHONE>); set validate.pii_policy=block to fail on them",
        "error" if pii_policy == "block" else "warning",
    )


def _meaning_findings(report: DataReport, markers: Tally, columns: Tally, sources: list[SourceInfo]) -> None:
    """Warnings for data that would train, but not as its author meant."""
    if report.kind == "preferences":
        _add(
            report,
            "transcript markers",
            markers,
            "string fields hold hh-rlhf `Human:`/`Assistant:` markers, which would train as literal text "
            "inside one message",
            "drop `prompt` and give `chosen`/`rejected` as whole transcripts (prompt + answer; tunegate "
            "splits them into messages), or give lists of messages",
            "warning",
        )
    lost = ", ".join(f"`{c}` ({MEANINGFUL_COLUMNS[c]}) ×{k}" for c, k in columns.causes.most_common())
    shapes = ", ".join(sorted({shape for s in sources for shape in s.shapes}))
    _add(
        report,
        "ignored columns",
        columns,
        f"columns that change what a row means are ignored by the detected shape ({shapes}): {lost}",
        "filter or convert the rows first (e.g. keep only label=true rows, or describe images in text), "
        "or drop the columns",
        "warning",
    )


def _where(frame: pd.DataFrame) -> list[str]:
    return [location(f, line) for f, line in zip(frame["file"], frame["line"], strict=True)]


# Rules that drop rows (the keys of `DataReport.dropped`): what they drop, and how to keep the rows.
DROP_RULES = {
    "too_long": (
        "longer than validate.max_length={max_length} tokens",
        "shorten those examples or raise validate.max_length",
    ),
}


def _suite_findings(report, outcomes, frame, min_rows, max_length, length_policy, max_dup, n) -> None:
    """Findings from the suite's verdicts over the kept rows; sample locations from the same rows."""
    kept = frame[frame["kept"]]
    n_dropped = len(frame) - len(kept)
    o = outcomes["min_rows"]
    dropped = f" ({n_dropped} more dropped for length)" if n_dropped else ""
    report.add(
        "enough rows",
        None
        if o.success
        else Finding(
            "enough rows",
            "error",
            len(kept),
            f"{len(kept)} rows kept{dropped}, at least {min_rows} required",
            f"add more examples, or lower validate.min_rows.{report.kind}"
            + (", or raise validate.max_length to keep the long ones" if n_dropped else ""),
        ),
    )
    o = outcomes["single_shape"]
    if o.success:
        report.add("one shape per split")
    else:
        counts = kept["shape"].astype(str).value_counts()  # ties: first seen wins
        minority = kept[kept["shape"] != counts.index[0]].head(n)
        report.add(
            "one shape per split",
            Finding(
                "one shape per split",
                "error",
                int((kept["shape"] != counts.index[0]).sum()),
                "mixed shapes: " + ", ".join(f"{s} ×{c}" for s, c in counts.items() if c),
                f"convert every row to one shape ({counts.index[0]})",
                [Sample(w, s) for w, s in zip(_where(minority), minority["shape"], strict=True)],
            ),
        )
    _duplicates_finding(report, outcomes, kept, max_dup, n)
    if "length" in outcomes:  # length_policy=fail: over-long rows fail the data
        o = outcomes["length"]
        too_long = kept[kept["n_tokens"] > max_length].head(n)
        report.add(
            "length",
            None
            if o.success
            else Finding(
                "length",
                "error",
                o.unexpected_count,
                f"rendered examples longer than validate.max_length={max_length} tokens",
                "shorten them, raise validate.max_length, or set validate.length_policy=drop to drop "
                "them (each recorded with its reason)",
                _token_samples(too_long),
            ),
        )
    elif length_policy == "drop" and frame["n_tokens"].any():  # counted with the tokenizer
        too_long = frame[~frame["kept"]].head(n)
        report.add(
            "length",
            Finding(
                "length",
                "warning",
                n_dropped,
                f"rendered examples longer than validate.max_length={max_length} tokens, dropped (each "
                "listed with its reason beside the kept rows)",
                "shorten them, or raise validate.max_length to keep them",
                _token_samples(too_long),
            )
            if n_dropped
            else None,
        )


def _token_samples(rows: pd.DataFrame) -> list[Sample]:
    return [Sample(w, f"{t} tokens") for w, t in zip(_where(rows), rows["n_tokens"], strict=True)]


def _duplicates_finding(report: DataReport, outcomes, kept: pd.DataFrame, max_dup: float, n: int) -> None:
    dup_mask = kept.duplicated("norm_hash", keep="first")
    n_dup = int(dup_mask.sum())
    if not n_dup:
        report.add("duplicates")
        return
    dups = kept[dup_mask].head(n)
    firsts = kept[~dup_mask & kept["norm_hash"].isin(dups["norm_hash"])]
    first_at = dict(zip(firsts["norm_hash"], _where(firsts), strict=True))
    samples = [
        Sample(w, f"duplicate of {first_at[h]}") for w, h in zip(_where(dups), dups["norm_hash"], strict=True)
    ]
    n_exact = int(kept.duplicated("exact_hash", keep="first").sum())
    o = outcomes["duplicates"]
    report.add(
        "duplicates",
        Finding(
            "duplicates",
            "warning" if o.success else "error",
            n_dup,
            f"{n_dup} rows repeat another after normalising case and whitespace ({n_exact} exactly); "
            f"{'within' if o.success else 'above'} the {max_dup:.0%} limit",
            "remove the repeats (the build stage drops them)"
            + ("" if o.success else ", or raise validate.max_duplicate_fraction"),
            samples,
        ),
    )


def _dropped_finding(
    report: DataReport, frame: pd.DataFrame, max_fraction: float, max_length: int, n: int
) -> None:
    """The data gate on rows that policies drop: more than `max_fraction` of the rows read fails, naming
    the rule that dropped most."""
    total = sum(report.dropped.values())
    share = total / report.rows_read if report.rows_read else 0.0
    if share <= max_fraction:
        report.add("dropped rows")
        return
    rule, count = max(report.dropped.items(), key=lambda kv: kv[1])
    what, fix = DROP_RULES[rule]
    report.add(
        "dropped rows",
        Finding(
            "dropped rows",
            "error",
            total,
            f"{total} of {report.rows_read} rows ({share:.1%}) dropped, above "
            f"validate.max_dropped_fraction={max_fraction:g}; most by {rule}: {count} rows "
            + what.format(max_length=max_length),
            f"{fix}, or raise validate.max_dropped_fraction if losing them is intended",
            _token_samples(frame[~frame["kept"]].head(n)),
        ),
    )


def _loss_mask_check(
    report: DataReport, sample: list[tuple[str, dict]], n_rows: int, tokenizer, n: int, train_on: str
) -> None:
    """The tokens an SFT row trains on are its assistant turns' (every one, or the last with
    `train_on=last_assistant`; data_checks/masks.py): they must be found, and each turn's must end
    with the end-of-turn token. Schema checks already guarantee non-empty answers; rendering a spread
    sample (the first row of each chunk) catches templates that still mask them out, without
    tokenizing a million rows twice."""
    eos = tokenizer.eos_token
    failed: list[tuple[Sample, str]] = []
    no_eos: list[Sample] = []
    for i, (where, norm) in enumerate(sample):
        try:
            masked = assistant_mask(tokenizer, norm["messages"], norm.get("tools"), train_on)
        except MaskError as exc:
            failed.append((Sample(where, str(exc).split(";")[0]), str(exc)))
            continue
        if i == 0:  # show a person which tokens train
            report.examples["loss mask"] = show_mask(tokenizer, masked.input_ids, masked.mask)
        if eos and (open_turn := next((e for b, e in masked.spans if eos not in masked.text[b:e]), None)):
            no_eos.append(Sample(where, repr(masked.text[max(0, open_turn - 50) : open_turn + 10])))
    if no_eos:
        finding = Finding(
            "loss mask",
            "error",
            n_rows,
            f"the chat template drops the end-of-turn token {eos!r} after the assistant's answer, so the "
            "model would never learn to stop",
            "use a chat template that closes assistant turns with the EOS token",
            no_eos[:n],
        )
    elif failed:
        message, _, fix = Counter(msg for _, msg in failed).most_common(1)[0][0].partition("; ")
        finding = Finding(
            "loss mask",
            "error",
            len(failed),
            f"in {len(failed)} of {len(sample)} rendered sample rows the trained tokens cannot be located: "
            + message,
            fix or "correct the conversation or the chat template",
            [s for s, _ in failed[:n]],
        )
    else:
        finding = None
    report.add("loss mask", finding)


def _last_user(messages: list[dict]) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


def _norm_hash(text: str) -> int:
    """64-bit hash of the text with case and whitespace normalised (collisions: ~1e-8 at 1M rows)."""
    return _hash(" ".join(text.lower().split()))


def _hash(text: str) -> int:
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _mask(secret: str) -> str:
    return secret[:4] + "…" + f"({len(secret)} chars)"
