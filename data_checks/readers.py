"""Read data files into rows that remember where they came from (file and 1-based line or row).

Tolerated as valid: a UTF-8 byte-order mark, CRLF line endings, blank lines. Anything that does not
parse becomes a `ParseProblem` naming the line, so every problem is reported at once.
"""

from __future__ import annotations

import glob
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED = (".jsonl", ".json", ".parquet", ".csv")


@dataclass(frozen=True)
class Row:
    file: str
    line: int  # 1-based line (JSONL), element (JSON), or data row (Parquet/CSV)
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


@dataclass
class ReadResult:
    rows: list[Row] = field(default_factory=list)
    problems: list[ParseProblem] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


def resolve_paths(spec: str | Path) -> list[Path]:
    """Expand a file, a directory of data files, or a glob into a sorted list of files."""
    spec = str(spec)
    p = Path(spec)
    if p.is_file() or is_hf_dataset_dir(p):
        return [p]
    if p.is_dir():
        return sorted(f for f in p.iterdir() if f.suffix in SUPPORTED)
    return sorted(Path(m) for m in glob.glob(spec, recursive=True) if Path(m).suffix in SUPPORTED)


def read_rows(spec: str | Path) -> ReadResult:
    """Read every file that `spec` names; never raises for bad content, only reports it."""
    result = ReadResult()
    paths = resolve_paths(spec)
    if not paths:
        result.problems.append(
            ParseProblem(str(spec), None, f"no data file found (supported: {', '.join(SUPPORTED)})")
        )
        return result
    for path in paths:
        result.files.append(str(path))
        reader = _read_hf_dataset if path.is_dir() else _READERS.get(path.suffix)
        if reader is None:
            result.problems.append(ParseProblem(str(path), None, f"unsupported file type {path.suffix!r}"))
            continue
        reader(path, result)
    return result


def _read_jsonl(path: Path, out: ReadResult) -> None:
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    lines = raw.split(b"\n")
    ends_without_newline = bool(raw) and not raw.endswith(b"\n")
    for i, line in enumerate(lines, start=1):
        line = line.rstrip(b"\r")
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            out.problems.append(
                ParseProblem(
                    str(path),
                    i,
                    f"invalid UTF-8 at byte {exc.start}",
                    _short(line.decode("utf-8", "replace")),
                )
            )
            continue
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            last = ends_without_newline and i == len(lines)
            what = "truncated last line (file ends mid-record)" if last else f"not valid JSON ({exc.msg})"
            out.problems.append(ParseProblem(str(path), i, what, _short(text)))
            continue
        if not isinstance(data, dict):
            out.problems.append(ParseProblem(str(path), i, "a line must hold a JSON object", _short(text)))
            continue
        out.rows.append(Row(str(path), i, data))


def _read_json(path: Path, out: ReadResult) -> None:
    raw = path.read_bytes()
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        out.problems.append(ParseProblem(str(path), None, f"invalid UTF-8 at byte {exc.start}"))
        return
    except json.JSONDecodeError as exc:
        out.problems.append(ParseProblem(str(path), exc.lineno, f"not valid JSON ({exc.msg})"))
        return
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} style
    if not isinstance(data, list):
        out.problems.append(ParseProblem(str(path), None, "a JSON file must hold a list of objects"))
        return
    for i, item in enumerate(data, start=1):
        if isinstance(item, dict):
            out.rows.append(Row(str(path), i, item))
        else:
            out.problems.append(
                ParseProblem(str(path), i, "element is not a JSON object", _short(repr(item)))
            )


def _read_table(path: Path, out: ReadResult) -> None:
    import pandas as pd

    try:
        if path.suffix == ".parquet":
            df = pd.read_parquet(path)
        else:
            df = pd.read_csv(path, encoding="utf-8-sig", keep_default_na=False, dtype=str)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a parse problem of this file
        out.problems.append(ParseProblem(str(path), None, f"cannot read: {type(exc).__name__}: {exc}"))
        return
    for i, rec in enumerate(df.to_dict(orient="records"), start=1):
        out.rows.append(Row(str(path), i, {k: _from_cell(v) for k, v in rec.items()}))


def is_hf_dataset_dir(path: Path) -> bool:
    """A directory written by `datasets.Dataset.save_to_disk` (or a DatasetDict's)."""
    return path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists())


def _read_hf_dataset(path: Path, out: ReadResult) -> None:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - any loader failure is a problem of this directory
        out.problems.append(
            ParseProblem(str(path), None, f"cannot load dataset: {type(exc).__name__}: {exc}")
        )
        return
    if isinstance(ds, DatasetDict):
        out.problems.append(
            ParseProblem(
                str(path),
                None,
                f"a DatasetDict with splits {sorted(ds)}; name one split directory, e.g. {path}/{next(iter(ds))}",
            )
        )
        return
    for i, rec in enumerate(ds, start=1):
        out.rows.append(Row(str(path), i, {k: _from_cell(v) for k, v in rec.items()}))


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


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_table, ".csv": _read_table}
