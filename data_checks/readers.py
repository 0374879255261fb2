"""Read data sources as a stream of chunks whose rows remember where they came from, so a
million-row file never sits in memory whole.

Sources: JSON Lines, JSON, Parquet and CSV files; JSON Lines, JSON and CSV compressed with gzip
(`.gz`), bzip2 (`.bz2`), xz (`.xz`) or, when the `zstandard` package is installed, zstd (`.zst`),
decompressed as they stream; `datasets.save_to_disk` directories; and Hugging Face Hub datasets,
written `hf:ORG/NAME[/CONFIG][@REVISION][:SPLIT]` (split `train` by default) or, in the config, as
`{hub_id, config, split, revision}`.

Locations: formats made of lines give the true 1-based line (`file.jsonl.gz:12`; in a JSON array
or wrapper, the line where the element starts). Tables give the data row (`file.parquet:row 5`;
CSV, `save_to_disk` and Hub datasets too, since a CSV cell may span lines).

A JSON file holds a list of rows, one row (a single object), or a wrapper: an object with exactly
one key whose value is a list, where that key is not a field of any row shape (`{"data": [...]}`,
`{"rows": [...]}`, `{"train": [...]}`). `{"messages": [...]}` is therefore one row, not 12.

Tolerated as valid: a UTF-8 byte-order mark, CRLF line endings, blank lines. Anything that does not
parse becomes a `ParseProblem` naming the line and the fix, so every problem is reported at once.

JSON Lines chunks carry the raw lines: whoever checks the chunk parses them (`parse_chunk`), which is
what lets validation spread parsing over worker processes.
"""

from __future__ import annotations

import functools
import glob
import io
import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

FORMATS = (".jsonl", ".json", ".parquet", ".csv")
COMPRESSIONS = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".zst": "zstd"}
COMPRESSIBLE = (".jsonl", ".json", ".csv")  # Parquet compresses inside the file
SUPPORTED = FORMATS + tuple(f + c for f in COMPRESSIBLE for c in COMPRESSIONS)
CHUNK_ROWS = 4096
_BOM = b"\xef\xbb\xbf"
# Fields that rows of some shape read: a one-key JSON object whose key is one of them is a row, not a wrapper.
ROW_FIELDS = frozenset(
    {"messages", "conversations", "prompt", "completion", "chosen", "rejected", "instruction", "output"}
)
REFORMAT_FIX = "re-export the file as UTF-8 JSON Lines, one complete object per line"
ZSTD_FIX = "`pip install zstandard`, or decompress the file first (`zstd -d FILE`)"


@dataclass(frozen=True)
class HubSource:
    """A dataset split on the Hugging Face Hub. `revision` None reads `main`, resolved to its commit."""

    hub_id: str
    config: str | None = None
    split: str = "train"
    revision: str | None = None

    def label(self, revision: str | None = None) -> str:
        rev = revision or self.revision
        return (
            f"hf:{self.hub_id}"
            + (f"/{self.config}" if self.config else "")
            + (f"@{rev}" if rev else "")
            + f":{self.split}"
        )

    def __str__(self) -> str:
        return self.label()


Source = Path | HubSource


@dataclass(frozen=True)
class Row:
    file: str
    line: int  # 1-based line (text formats) or data row (tables, datasets)
    data: dict[str, Any]

    @property
    def where(self) -> str:
        return location(self.file, self.line)


@dataclass(frozen=True)
class ParseProblem:
    file: str
    line: int | None
    what: str
    value: str = ""
    fix: str = REFORMAT_FIX

    @property
    def where(self) -> str:
        return location(self.file, self.line) if self.line else self.file


@dataclass
class Chunk:
    """Up to CHUNK_ROWS records of one source: raw JSONL lines (bytes) or already-parsed dicts.
    `meta` (on a source's first chunk) records what reading learnt: a Hub dataset's resolved revision
    and digest."""

    file: str
    lines: list[int] = field(default_factory=list)
    records: list[bytes | dict[str, Any]] = field(default_factory=list)
    problems: list[ParseProblem] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)


def location(file: str, n: int) -> str:
    """`file:line` for text formats, `file:row n` for tables and datasets."""
    return f"{file}:{n}" if file_format(file)[0] in (".jsonl", ".json") else f"{file}:row {n}"


@functools.lru_cache(maxsize=256)
def file_format(path: str | Path) -> tuple[str, str | None]:
    """(format suffix, compression) of a file name, e.g. ('.jsonl', 'gzip'); ('', None) if unknown."""
    name = str(path)
    if name.startswith("hf:"):
        return "", None
    suffixes = [s.lower() for s in Path(name).suffixes]
    compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    if compression is not None:
        suffixes = suffixes[:-1]
    fmt = suffixes[-1] if suffixes and suffixes[-1] in FORMATS else ""
    if compression is not None and fmt not in COMPRESSIBLE:
        fmt = ""
    return fmt, compression


def describe_format(source: str | Source) -> str:
    """e.g. 'JSON Lines, gzip', 'Parquet', 'Hub dataset'."""
    if isinstance(source, HubSource) or str(source).startswith("hf:"):
        return "Hub dataset"
    fmt, compression = file_format(source)
    name = {".jsonl": "JSON Lines", ".json": "JSON", ".parquet": "Parquet", ".csv": "CSV"}.get(
        fmt, "save_to_disk dataset" if Path(source).is_dir() else "unknown"
    )
    return f"{name}, {compression}" if compression else name


def is_supported(path: Path) -> bool:
    return file_format(path)[0] != ""


def hub_source(spec: Any) -> HubSource | None:
    """The Hub dataset `spec` names (`hf:...` text, or a mapping/config object with `hub_id`), else None."""
    if isinstance(spec, HubSource):
        return spec
    if hasattr(spec, "model_dump"):  # tunegate.config.HubDataset
        spec = spec.model_dump()
    if isinstance(spec, Mapping):
        if "hub_id" not in spec:
            return None
        return HubSource(
            str(spec["hub_id"]), spec.get("config"), spec.get("split") or "train", spec.get("revision")
        )
    if not isinstance(spec, str) or not spec.startswith("hf:"):
        return None
    rest, split = spec[3:], "train"
    if ":" in rest:
        rest, split = rest.rsplit(":", 1)
    revision = None
    if "@" in rest:
        rest, revision = rest.rsplit("@", 1)
    parts = rest.split("/")
    hub_id, config = ("/".join(parts[:2]), parts[2]) if len(parts) == 3 else (rest, None)
    return HubSource(hub_id, config, split or "train", revision or None)


def resolve_sources(spec: Any) -> list[Source]:
    """Expand a file, a directory of data files, a glob, a Hub dataset, or a list of those into a list
    of sources (sorted within each directory or glob; a list keeps its order, without repeats)."""
    if isinstance(spec, list | tuple):
        return list(dict.fromkeys(p for part in spec for p in resolve_sources(part)))
    if (hub := hub_source(spec)) is not None:
        return [hub]
    spec = str(spec)
    p = Path(spec)
    if p.is_file() or is_hf_dataset_dir(p):
        return [p]
    if p.is_dir():
        return sorted(f for f in p.iterdir() if f.is_file() and is_supported(f))
    return sorted(Path(m) for m in glob.glob(spec, recursive=True) if is_supported(Path(m)))


def resolve_paths(spec: Any) -> list[Path]:
    """The local files and directories of `spec` (its Hub datasets left out)."""
    return [s for s in resolve_sources(spec) if isinstance(s, Path)]


def outside_roots(paths: list[Path], roots: list[Path]) -> list[Path]:
    """The paths that are not inside one of `roots` once `..` and symbolic links are resolved."""
    real_roots = [r.resolve() for r in roots]
    return [p for p in paths if not any(p.resolve().is_relative_to(r) for r in real_roots)]


def input_bytes(sources: list[Source]) -> int:
    """Bytes on disk (compressed files count compressed; Hub datasets count nothing)."""
    paths = [p for p in sources if isinstance(p, Path)]
    return sum(
        sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
        for p in paths
    )


def iter_chunks(sources: list[Source], size: int | None = None) -> Iterator[Chunk]:
    """Stream every source as chunks; never raises for bad content, only reports it in a chunk."""
    size = size or CHUNK_ROWS
    for source in sources:
        if isinstance(source, HubSource):
            yield from _hub_chunks(source, size)
            continue
        if source.is_dir():
            yield from _hf_chunks(source, size)
            continue
        fmt = file_format(source)[0]
        if not fmt:
            yield Chunk(str(source), problems=[_unsupported(source)])
            continue
        yield from _READERS[fmt](source, size)


def no_files_problem(spec: Any) -> ParseProblem:
    return ParseProblem(
        str(spec),
        None,
        "no data file found",
        fix=f"point at a file, directory or glob of {', '.join(FORMATS)} files (compressed: "
        f"{', '.join(COMPRESSIONS)}), a save_to_disk directory, or hf:ORG/NAME@REVISION:SPLIT",
    )


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


def _unsupported(path: Path) -> ParseProblem:
    suffixes = "".join(path.suffixes[-2:]) or "(no suffix)"
    _, compression = file_format(path)
    if compression is not None:
        fix = (
            f"name the file after its content, e.g. data.jsonl{path.suffix} ({compression} is read for "
            f"{', '.join(COMPRESSIBLE)}); for other content, decompress it and convert it to JSON Lines"
        )
    else:
        fix = f"convert it to one of {', '.join(FORMATS)} (optionally compressed: {', '.join(COMPRESSIONS)})"
    return ParseProblem(str(path), None, f"unsupported file type {suffixes!r}", fix=fix)


def _open(path: Path) -> IO[bytes]:
    """The file's bytes, decompressed as they are read. Raises ModuleNotFoundError for `.zst` without
    `zstandard`."""
    compression = file_format(path)[1]
    if compression == "gzip":
        import gzip

        return gzip.open(path, "rb")
    if compression == "bzip2":
        import bz2

        return bz2.open(path, "rb")
    if compression == "xz":
        import lzma

        return lzma.open(path, "rb")
    if compression == "zstd":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _cannot_open(path: Path, exc: Exception) -> ParseProblem:
    if isinstance(exc, ModuleNotFoundError) and exc.name == "zstandard":
        return ParseProblem(
            str(path), None, "zstd-compressed, and the `zstandard` package is not installed", fix=ZSTD_FIX
        )
    return ParseProblem(str(path), None, f"cannot open: {type(exc).__name__}: {exc}", fix="check the file")


def _decompress_problem(path: Path, line: int, exc: Exception) -> ParseProblem:
    after = f" after line {line}" if line else ""
    return ParseProblem(
        str(path),
        None,
        f"cannot decompress{after} ({type(exc).__name__}: {exc})",
        fix="the compressed file is damaged or truncated: download or compress it again",
    )


def _decompress_errors() -> tuple[type[BaseException], ...]:
    import lzma

    errors: tuple[type[BaseException], ...] = (OSError, EOFError, lzma.LZMAError)
    try:
        import zstandard

        errors += (zstandard.ZstdError,)
    except ModuleNotFoundError:
        pass
    return errors


def _parse_line(file: str, i: int, raw: bytes) -> Row | ParseProblem:
    last = not raw.endswith(b"\n")  # only a file's final line can lack its newline
    raw = raw.rstrip(b"\r\n")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return ParseProblem(
            file,
            i,
            f"invalid UTF-8 at byte {exc.start}",
            _short(raw.decode("utf-8", "replace")),
            fix="re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)",
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
    chunk, i = Chunk(str(path)), 0
    try:
        f = _open(path)
    except (ModuleNotFoundError, OSError) as exc:
        yield Chunk(str(path), problems=[_cannot_open(path, exc)])
        return
    try:
        with f:
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
    except _decompress_errors() as exc:
        chunk.problems.append(_decompress_problem(path, i - 1, exc))
        yield chunk
        return
    if chunk.lines:
        yield chunk


def _json_chunks(path: Path, size: int) -> Iterator[Chunk]:
    """A JSON file is parsed whole (it is one value), element by element so each row keeps its line."""
    file = str(path)
    try:
        with _open(path) as f:
            raw = f.read()
    except ModuleNotFoundError as exc:
        yield Chunk(file, problems=[_cannot_open(path, exc)])
        return
    except _decompress_errors() as exc:
        yield Chunk(file, problems=[_decompress_problem(path, 0, exc)])
        return
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        fix = "re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        yield Chunk(file, problems=[ParseProblem(file, line, f"invalid UTF-8 at byte {exc.start}", fix=fix)])
        return
    del raw
    chunk = Chunk(file)
    for item in _json_items(file, text):
        if isinstance(item, ParseProblem):
            chunk.problems.append(item)
            continue
        chunk.lines.append(item[0])
        chunk.records.append(item[1])
        if len(chunk.lines) == size:
            yield chunk
            chunk = Chunk(file)
    if chunk.lines or chunk.problems:
        yield chunk


_SPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


class _Lines:
    """1-based line of a position in `text`, for positions visited in increasing order."""

    def __init__(self, text: str) -> None:
        self.text, self.pos, self.line = text, 0, 1

    def at(self, pos: int) -> int:
        self.line += self.text.count("\n", self.pos, pos)
        self.pos = pos
        return self.line


def _json_items(file: str, text: str) -> Iterator[tuple[int, dict[str, Any]] | ParseProblem]:
    """(line, row) for each row of a JSON document: an array's elements, a wrapper's elements, or
    the one object; problems for anything else, each at its line."""
    lines = _Lines(text)
    i = _SPACE.match(text, 0).end()
    if i == len(text):
        yield ParseProblem(file, None, "empty JSON file")
        return
    if text[i] == "[":
        end = yield from _array_items(file, text, i, lines)
    elif text[i] == "{" and (wrapper := _wrapper_list(text, i)) is not None:
        items: list = []
        end = _drain(_array_items(file, text, wrapper, lines), items)
        if end is not None:
            end = _SPACE.match(text, end).end()
            if text[end : end + 1] != "}":  # a second key: not a wrapper, so the object is one row
                yield from _one_value(file, text, i, _Lines(text))
                return
            end += 1
        yield from items
    else:
        end = yield from _one_value(file, text, i, lines)
    if end is not None and (extra := _SPACE.match(text, end).end()) < len(text):
        yield ParseProblem(
            file, lines.at(extra), "extra data after the JSON value", _short(text[extra : extra + 80])
        )


def _wrapper_list(text: str, i: int) -> int | None:
    """Where the list starts if the object at `i` opens as a wrapper (`{"data": [`), else None."""
    j = _SPACE.match(text, i + 1).end()
    try:
        key, j = _DECODER.raw_decode(text, j)
    except json.JSONDecodeError:
        return None
    j = _SPACE.match(text, j).end()
    if not isinstance(key, str) or key in ROW_FIELDS or text[j : j + 1] != ":":
        return None
    j = _SPACE.match(text, j + 1).end()
    return j if text[j : j + 1] == "[" else None


def _array_items(file: str, text: str, i: int, lines: _Lines):
    """Elements of the array opening at `i`, each at the line where it starts; returns the position
    after the array, or None when the array is broken (the problem is yielded)."""
    i = _SPACE.match(text, i + 1).end()
    if text[i : i + 1] == "]":
        return i + 1
    while True:
        end = yield from _one_value(file, text, i, lines, "element is not a JSON object")
        if end is None:
            return None
        i = _SPACE.match(text, end).end()
        sep = text[i : i + 1]
        if sep == "]":
            return i + 1
        if sep != ",":
            what = (
                "truncated (file ends inside the list)" if not sep else "expected ',' or ']' between elements"
            )
            yield ParseProblem(file, lines.at(i), what, _short(text[i : i + 80]))
            return None
        i = _SPACE.match(text, i + 1).end()


def _drain(items: Iterator, into: list) -> Any:
    """Append what the generator `items` yields to `into`; return what it returns."""
    while True:
        try:
            into.append(next(items))
        except StopIteration as stop:
            return stop.value


_NOT_A_ROW = 'a JSON file must hold a list of objects, one object, or a wrapper like {"data": [...]}'


def _one_value(file: str, text: str, i: int, lines: _Lines, not_object: str = _NOT_A_ROW):
    """The JSON value at `i`, yielded with its line if it is an object (a row), else a problem saying
    `not_object`; returns the position after it, or None when it does not parse."""
    line = lines.at(i)
    try:
        value, end = _DECODER.raw_decode(text, i)
    except json.JSONDecodeError as exc:
        yield _json_problem(file, text, exc, lines)
        return None
    if isinstance(value, dict):
        yield line, value
    else:
        yield ParseProblem(file, line, not_object, _short(repr(value)))
    return end


def _json_problem(file: str, text: str, exc: json.JSONDecodeError, lines: _Lines) -> ParseProblem:
    if exc.pos >= len(text.rstrip()):
        return ParseProblem(file, exc.lineno, "truncated (file ends mid-record)")
    return ParseProblem(file, exc.lineno, f"not valid JSON ({exc.msg})", _short(text[exc.pos : exc.pos + 60]))


def _record_chunks(file: str, batches: Iterator[list[dict[str, Any]]], meta=None) -> Iterator[Chunk]:
    """Chunks from batches of table records, numbering data rows from 1; a read error ends the source."""
    n = 0
    try:
        for records in batches:
            yield Chunk(
                file,
                list(range(n + 1, n + len(records) + 1)),
                [{k: _from_cell(v) for k, v in rec.items()} for rec in records],
                meta=dict(meta or {}) if n == 0 else {},
            )
            n += len(records)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a parse problem of this source
        if isinstance(exc, ModuleNotFoundError) and exc.name == "zstandard":
            yield Chunk(file, problems=[_cannot_open(Path(file), exc)])
            return
        if file_format(file)[1] and isinstance(exc, _decompress_errors()):
            yield Chunk(file, problems=[_decompress_problem(Path(file), 0, exc)])
            return
        where = f" after row {n}" if n else ""
        problem = ParseProblem(file, None, f"cannot read{where}: {type(exc).__name__}: {exc}")
        yield Chunk(file, problems=[problem])


def _parquet_chunks(path: Path, size: int) -> Iterator[Chunk]:
    def batches():
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=size):
            yield batch.to_pylist()

    yield from _record_chunks(str(path), batches())


def _csv_chunks(path: Path, size: int) -> Iterator[Chunk]:
    def batches():
        import pandas as pd

        with (
            _open(path) as f,
            pd.read_csv(f, encoding="utf-8-sig", keep_default_na=False, dtype=str, chunksize=size) as reader,
        ):
            for frame in reader:
                yield frame.to_dict(orient="records")

    yield from _record_chunks(str(path), batches())


def is_hf_dataset_dir(path: Path) -> bool:
    """A directory written by `datasets.Dataset.save_to_disk` (or a DatasetDict's)."""
    return path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists())


def _hf_chunks(path: Path, size: int) -> Iterator[Chunk]:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - any loader failure is a problem of this directory
        problem = ParseProblem(str(path), None, f"cannot load dataset: {type(exc).__name__}: {exc}")
        yield Chunk(str(path), problems=[problem])
        return
    if isinstance(ds, DatasetDict):
        split = f"{path}/{next(iter(ds))}"
        problem = ParseProblem(
            str(path),
            None,
            f"a DatasetDict with splits {sorted(ds)}",
            fix=f"name one split directory, e.g. {split}",
        )
        yield Chunk(str(path), problems=[problem])
        return
    yield from _record_chunks(str(path), _dataset_batches(ds, size))


def load_hub_dataset(source: HubSource):
    """The one function that reaches the Hugging Face Hub: resolve `source.revision` (default `main`)
    to its commit, then load that commit's split. Returns (datasets.Dataset, commit sha).

    A full 40-hex commit sha is not resolved again, so a pinned revision loads from the local cache
    with `HF_HUB_OFFLINE=1`."""
    from datasets import load_dataset

    revision = source.revision or "main"
    if not re.fullmatch(r"[0-9a-f]{40}", revision):
        from huggingface_hub import HfApi

        revision = HfApi().dataset_info(source.hub_id, revision=revision).sha
    ds = load_dataset(source.hub_id, source.config, split=source.split, revision=revision)
    return ds, revision


def _hub_chunks(source: HubSource, size: int) -> Iterator[Chunk]:
    try:
        ds, sha = load_hub_dataset(source)
    except Exception as exc:  # noqa: BLE001 - any Hub or loader failure is a problem of this source
        problem = ParseProblem(
            str(source),
            None,
            f"cannot load the Hub dataset: {type(exc).__name__}: {str(exc)[:200]}",
            fix="check the id, config, split and revision; without network (HF_HUB_OFFLINE=1) pin a full "
            "commit sha already in the local cache, or save the split with save_to_disk and point at it",
        )
        yield Chunk(str(source), problems=[problem])
        return
    meta = {"source": str(source), "revision": sha, "sha256": _dataset_digest(ds)}
    yield from _record_chunks(source.label(sha), _dataset_batches(ds, size), meta)


def _dataset_batches(ds, size: int) -> Iterator[list[dict[str, Any]]]:
    for batch in ds.iter(batch_size=size):
        columns = list(batch)
        yield [dict(zip(columns, values, strict=True)) for values in zip(*batch.values(), strict=True)]


def _dataset_digest(ds) -> str:
    """sha256 over the Arrow files a loaded dataset reads (its content as downloaded)."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(c["filename"] for c in ds.cache_files):
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    if not ds.cache_files:  # an in-memory dataset: its fingerprint is all there is
        h.update(ds._fingerprint.encode())
    return h.hexdigest()


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
