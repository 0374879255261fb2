"""Hostile inputs for the data validator, as hypothesis strategies, and the invariant they must keep.

Used by the property tests (tests/test_fuzz.py) and by the longer fuzzing run
(benchmarks/fuzz_parsers.py). The invariant: whatever the bytes, `_check_chunk` returns a result,
never an exception, and every row it read is accounted for (kept, or counted under a finding that
names where it is).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from data_checks.checks import CheckSettings, ChunkResult, _check_chunk
from data_checks.readers import iter_chunks

KINDS = ("sft", "preferences", "prompts", "eval")
FORMATS = ("jsonl", "json", "csv", "parquet", "jsonl.gz", "json.gz")
# The names the shape detector and normalisers look for: fuzzing near them reaches deep code.
KEYS = [
    "messages",
    "role",
    "content",
    "conversations",
    "from",
    "value",
    "prompt",
    "completion",
    "chosen",
    "rejected",
    "instruction",
    "input",
    "output",
    "expected_any",
    "exact",
    "regex",
    "json_schema",
    "refuse",
    "set",
    "system",
]
ROLES = ["user", "assistant", "system", "tool", "human", "gpt", "", "USER", "robot"]

_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40
)  # no lone surrogates: not encodable
_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63),
    st.floats(allow_nan=True, allow_infinity=True),
    _text,
    st.sampled_from(ROLES),
)
_message = st.fixed_dictionaries(
    {},
    optional={
        "role": st.one_of(st.sampled_from(ROLES), _scalar),
        "content": st.one_of(_text, _scalar, st.lists(_scalar, max_size=3)),
        "from": st.sampled_from(ROLES),
        "value": _text,
    },
)
_value = st.recursive(
    st.one_of(_scalar, _message, st.lists(_message, max_size=4)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS) | _text, inner, max_size=5)
    ),
    max_leaves=20,
)
_words = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)


def _turn(role: str):
    return st.fixed_dictionaries({"role": st.just(role), "content": _words})


_conversation = st.tuples(_turn("user"), _turn("assistant")).map(list)
# Rows of every kind in the shapes the validator accepts: the valid path has to be fuzzed too.
_valid = st.one_of(
    st.fixed_dictionaries({"messages": _conversation}),
    st.fixed_dictionaries(
        {
            "conversations": st.lists(
                st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt"]), "value": _words}),
                min_size=2,
                max_size=3,
            )
        }
    ),
    st.fixed_dictionaries({"instruction": _words, "input": _text, "output": _words}),
    st.fixed_dictionaries({"prompt": _words, "completion": _words}),
    st.fixed_dictionaries(
        {
            "prompt": st.tuples(_turn("user")).map(list),
            "chosen": st.tuples(_turn("assistant")).map(list),
            "rejected": st.tuples(_turn("assistant")).map(list),
        }
    ),
    st.fixed_dictionaries({"chosen": _conversation, "rejected": _conversation}),
    st.fixed_dictionaries({"prompt": st.tuples(_turn("user")).map(list)}),
    st.fixed_dictionaries(
        {"prompt": st.tuples(_turn("user")).map(list)},
        optional={
            "expected_any": st.lists(_words, min_size=1, max_size=3),
            "exact": _words,
            "regex": st.sampled_from(["\\d+", "(", "[a-z]+", "a{2,}"]),
            "json_schema": st.sampled_from([{"type": "object"}, {"type": 5}, {"required": ["x"]}]),
            "refuse": st.booleans(),
            "set": st.sampled_from(["task", "canary", "safety", "other"]),
        },
    ),
)


@st.composite
def _mutated(draw):
    """A valid row with, now and then, one field replaced by anything at all."""
    row = dict(draw(_valid))
    if draw(st.booleans()):
        key = draw(st.sampled_from(sorted(row) + KEYS))
        row[key] = draw(_value)
    return row


records = st.one_of(_mutated(), st.dictionaries(st.sampled_from(KEYS), _value, max_size=6))
# Lines as they arrive in a JSONL file: mostly JSON objects near the schema, some anything at all.
jsonl_lines = st.lists(
    st.one_of(
        records.map(lambda r: json.dumps(r, allow_nan=True).encode()),
        _value.map(lambda v: json.dumps(v, allow_nan=True).encode()),
        st.binary(max_size=60).filter(lambda b: b"\n" not in b and b"\r" not in b),
    ),
    max_size=8,
)


@st.composite
def files(draw, fmt: str) -> bytes | list[dict[str, Any]]:
    """The content of one file in `fmt`: bytes, or for parquet the records to write. Compressed formats
    hold the same content gzipped, now and then cut short."""
    if fmt.endswith(".gz"):
        raw = gzip.compress(draw(files(fmt.removesuffix(".gz"))), mtime=0)
        return raw[: draw(st.integers(0, len(raw)))] if draw(st.booleans()) else raw
    if fmt == "jsonl":
        return b"\n".join(draw(jsonl_lines)) + draw(st.sampled_from([b"", b"\n", b"\r\n"]))
    if fmt == "json":
        top = draw(
            st.one_of(
                st.lists(records, max_size=6),
                records,  # one row
                st.dictionaries(
                    st.sampled_from(["data", "rows", "messages"]), st.lists(records, max_size=3), max_size=2
                ),
                _value,
            )
        )
        raw = json.dumps(top, allow_nan=True, indent=draw(st.sampled_from([None, 1]))).encode()
        return raw[: draw(st.integers(0, len(raw)))] if draw(st.booleans()) else raw  # maybe truncated
    if fmt == "csv":
        header = draw(st.lists(st.sampled_from(KEYS) | _text, min_size=0, max_size=4))
        rows = draw(st.lists(st.lists(_text, max_size=5), max_size=5))
        text = "\n".join([",".join(header), *(",".join(json.dumps(c) for c in r) for r in rows)])
        return text.encode("utf-8")
    # parquet: one type per column, as a real table has
    columns = draw(st.lists(st.sampled_from(KEYS), max_size=4, unique=True))
    n = draw(st.integers(0, 5))
    return [{c: draw(st.one_of(st.none(), _text)) for c in columns} for _ in range(n)]


def write(path: Path, content: bytes | list[dict[str, Any]]) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(content) if content else pa.table({}), path)
    return path


def check_file(kind: str, path: Path) -> list[ChunkResult]:
    """Run the per-row checks over `path`, assert the invariant, and return each chunk's result."""
    settings = CheckSettings(kind, None, None, None, 512, True, 5)
    results = []
    for chunk in iter_chunks([path]):
        result = _check_chunk(settings, chunk)
        rejected = sum(result.tallies[t].count for t in ("shape", "schema"))
        assert len(result.shapes) + rejected == result.rows_read, (result.rows_read, rejected)
        for name in ("parse", "shape", "schema"):
            assert all(s.where.startswith(str(path)) for s in result.tallies[name].samples), name
        results.append(result)
    return results
