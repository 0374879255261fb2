"""Read data files as a stream of chunks whose rows remember where they came from (file and 1-based
line or row), so a million-row file never sits in memory whole.

Tolerated as valid: a UTF-8 byte-order mark, CRLF line endings, blank lines. Anything that does not
parse becomes a `ParseProblem` naming the line, so every problem is reported at once.

JSON Lines chunks carry the raw lines: whoever checks the chunk parses them (`parse_chunk`), which is
what lets validation spread parsing over worker processes.
"""

from __future__ import annotations

import glob
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED = (".jsonl", ".json", ".parquet", ".csv")
CHUNK_ROWS = 4096
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Row:
    file: str
    line: int  # 1-based line (JSONL), element (JSON), or data row (Parquet/CSV/HF dataset)
    data: dict[str, Any]

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class ParseProblem:
    file: str
    line: int | None
    what: str
    value: str = ""

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}" if self.line else self.file


@dataclass
class Chunk:
    """Up to CHUNK_ROWS records of one file: raw JSONL lines (bytes) or already-parsed dicts."""

    file: str
    lines: list[int] = field(default_factory=list)
    records: list[bytes | dict[str, Any]] = field(default_factory=list)
    problems: list[ParseProblem] = field(default_factory=list)


def resolve_paths(spec: str | Path | list[str | Path]) -> list[Path]:
    """Expand a file, a directory of data files, a glob, or a list of those into a list of files
    (sorted within each directory or glob; a list keeps its order, without repeats)."""
    if isinstance(spec, list | tuple):
        return list(dict.fromkeys(p for part in spec for p in resolve_paths(part)))
    spec = str(spec)
    p = Path(spec)
    if p.is_file() or is_hf_dataset_dir(p):
        return [p]
    if p.is_dir():
        return sorted(f for f in p.iterdir() if f.suffix in SUPPORTED)
    return sorted(Path(m) for m in glob.glob(spec, recursive=True) if Path(m).suffix in SUPPORTED)


def outside_roots(paths: list[Path], roots: list[Path]) -> list[Path]:
    """The paths that are not inside one of `roots` once `..` and symbolic links are resolved."""
    real_roots = [r.resolve() for r in roots]
    return [p for p in paths if not any(p.resolve().is_relative_to(r) for r in real_roots)]


def input_bytes(paths: list[Path]) -> int:
    return sum(
        sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
        for p in paths
    )


def iter_chunks(paths: list[Path], size: int | None = None) -> Iterator[Chunk]:
    """Stream every file as chunks; never raises for bad content, only reports it in a chunk."""
    size = size or CHUNK_ROWS
    for path in paths:
        reader = _hf_chunks if path.is_dir() else _READERS.get(path.suffix)
        if reader is None:
            yield Chunk(
                str(path), problems=[ParseProblem(str(path), None, f"unsupported file type {path.suffix!r}")]
            )
            continue
        yield from reader(path, size)


def no_files_problem(spec: str | Path) -> ParseProblem:
    return ParseProblem(str(spec), None, f"no data file found (supported: {', '.join(SUPPORTED)})")


def parse_chunk(chunk: Chunk) -> tuple[list[Row], list[ParseProblem]]:
    """Rows of a chunk, parsing raw JSONL lines; unparseable lines become problems."""
    rows, problems = [], list(chunk.problems)
    for line, record in zip(chunk.lines, chunk.records, strict=True):
        if isinstance(record, dict):
            rows.append(Row(chunk.file, line, record))
            continue
        parsed = _parse_line(chunk.file, line, record)
        (rows if isinstance(parsed, Row) else problems).append(parsed)
    return rows, problems


def _parse_line(file: str, i: int, raw: bytes) -> Row | ParseProblem:
    last = not raw.endswith(b"\n")  # only a file's final line can lack its newline
    raw = raw.rstrip(b"\r\n")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return ParseProblem(
            file, i, f"invalid UTF-8 at byte {exc.start}", _short(raw.decode("utf-8", "replace"))
        )
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        what = "truncated last line (file ends mid-record)" if last else f"not valid JSON ({exc.msg})"
        return ParseProblem(file, i, what, _short(text))
    if not isinstance(data, dict):
        return ParseProblem(file, i, "a line must hold a JSON object", _short(text))
    return Row(file, i, data)


def _jsonl_chunks(path: Path, size: int) -> Iterator[Chunk]:
    chunk = Chunk(str(path))
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            if i == 1 and raw.startswith(_BOM):
                raw = raw[3:]
            if not raw.strip():
                continue
            chunk.lines.append(i)
            chunk.records.append(raw)
            if len(chunk.lines) == size:
                yield chunk
                chunk = Chunk(str(path))
    if chunk.lines:
        yield chunk


def _json_chunks(path: Path, size: int) -> Iterator[Chunk]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        yield Chunk(str(path), problems=[ParseProblem(str(path), None, f"invalid UTF-8 at byte {exc.start}")])
        return
    except json.JSONDecodeError as exc:
        yield Chunk(str(path), problems=[ParseProblem(str(path), exc.lineno, f"not valid JSON ({exc.msg})")])
        return
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} style
    if not isinstance(data, list):
        yield Chunk(
            str(path), problems=[ParseProblem(str(path), None, "a JSON file must hold a list of objects")]
        )
        return
    for start in range(0, len(data), size):
        chunk = Chunk(str(path))
        for i, item in enumerate(data[start : start + size], start=start + 1):
            if isinstance(item, dict):
                chunk.lines.append(i)
                chunk.records.append(item)
            else:
                chunk.problems.append(
                    ParseProblem(str(path), i, "element is not a JSON object", _short(repr(item)))
                )
        yield chunk


def _record_chunks(path: Path, batches: Iterator[list[dict[str, Any]]]) -> Iterator[Chunk]:
    """Chunks from batches of table records, numbering data rows from 1; a read error ends the file."""
    n = 0
    try:
        for records in batches:
            yield Chunk(
                str(path),
                list(range(n + 1, n + len(records) + 1)),
                [{k: _from_cell(v) for k, v in rec.items()} for rec in records],
            )
            n += len(records)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a parse problem of this file
        where = f" after row {n}" if n else ""
        yield Chunk(
            str(path),
            problems=[ParseProblem(str(path), None, f"cannot read{where}: {type(exc).__name__}: {exc}")],
        )


def _parquet_chunks(path: Path, size: int) -> Iterator[Chunk]:
    def batches():
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=size):
            yield batch.to_pylist()

    yield from _record_chunks(path, batches())


def _csv_chunks(path: Path, size: int) -> Iterator[Chunk]:
    def batches():
        import pandas as pd

        with pd.read_csv(
            path, encoding="utf-8-sig", keep_default_na=False, dtype=str, chunksize=size
        ) as reader:
            for frame in reader:
                yield frame.to_dict(orient="records")

    yield from _record_chunks(path, batches())


def is_hf_dataset_dir(path: Path) -> bool:
    """A directory written by `datasets.Dataset.save_to_disk` (or a DatasetDict's)."""
    return path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists())


def _hf_chunks(path: Path, size: int) -> Iterator[Chunk]:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - any loader failure is a problem of this directory
        yield Chunk(
            str(path),
            problems=[ParseProblem(str(path), None, f"cannot load dataset: {type(exc).__name__}: {exc}")],
        )
        return
    if isinstance(ds, DatasetDict):
        split = f"{path}/{next(iter(ds))}"
        problem = ParseProblem(
            str(path), None, f"a DatasetDict with splits {sorted(ds)}; name one split directory, e.g. {split}"
        )
        yield Chunk(str(path), problems=[problem])
        return

    def batches():
        for batch in ds.iter(batch_size=size):
            columns = list(batch)
            yield [dict(zip(columns, values, strict=True)) for values in zip(*batch.values(), strict=True)]

    yield from _record_chunks(path, batches())


def _from_cell(value: Any) -> Any:
    """Parquet gives numpy arrays for lists; CSV gives JSON text for nested columns."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        return [_from_cell(v) for v in value]
    if isinstance(value, dict):
        return {k: _from_cell(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _short(text: str, limit: int = 80) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 1] + "…"


_READERS = {".jsonl": _jsonl_chunks, ".json": _json_chunks, ".parquet": _parquet_chunks, ".csv": _csv_chunks}
