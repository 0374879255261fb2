"""Stage 2: build the instruction datasets (TRL formats) from validated data.

Streams each validated file once: drops normalised duplicates (the validate stage hashed each row),
splits train/eval by a stable seeded hash of the prompt (a row never changes side when others are
added; preference pairs go three ways, see `preference_split`), and writes Parquet in bounded batches,
so a million rows build in constant memory. The manifest records the raw sources and their digests,
row counts at each step, every dropped row with its reason (`dropped.jsonl`), and the output digests.
Re-running on the same inputs gives byte-identical outputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data_checks.formats import arrow_schema
from tunegate.artifacts import DataFile, InstructionDataset, ValidatedData, sha256_file
from tunegate.config import BuildSection

log = logging.getLogger(__name__)

SPLITS = (
    ("sft", "sft_train", "sft_eval"),
    ("preferences", "pref_train", "pref_eval"),
    ("prompts", "prompts", None),
    ("eval", "eval", None),
)
ROW_GROUP = 65_536


def build_datasets(cfg: BuildSection, data: ValidatedData, *, out_dir: Path, seed: int) -> InstructionDataset:
    """Write sft_train/sft_eval, pref_train/pref_judge/pref_eval, prompts and eval splits as Parquet
    (pref_judge only with `cfg.judge_fraction` above 0)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    splits: dict[str, DataFile] = {}
    counts: dict[str, dict[str, int]] = {}
    reasons: Counter = Counter()
    dropped_path = out_dir / "dropped.jsonl"
    with open(dropped_path.with_suffix(".tmp"), "w", encoding="utf-8") as dropped:
        for kind, train_name, eval_name in SPLITS:
            if kind not in data.files:
                continue
            for line in _lines(data.dropped.get(kind)):  # dropped by the validate stage's policy
                record = json.loads(line)
                reasons[f"{kind}: {record['reason'].split(':')[0]}"] += 1
                dropped.write(
                    json.dumps({"kind": kind, "step": "validate", **record}, ensure_ascii=False) + "\n"
                )
            names = [train_name] if eval_name is None else [train_name, eval_name]
            if kind == "preferences" and cfg.judge_fraction > 0:
                names.append("pref_judge")
            writers = {name: _ParquetSink(out_dir / f"{name}.parquet", arrow_schema(kind)) for name in names}
            first_seen: dict[int, str] = {}
            n_in = 0
            for line in _lines(data.files[kind].path):
                row = json.loads(line)
                n_in += 1
                if (where := first_seen.get(row["_hash"])) is not None:
                    reasons[f"{kind}: duplicate"] += 1
                    record = {
                        "kind": kind,
                        "step": "build",
                        "where": row["_where"],
                        "reason": f"duplicate of {where}",
                    }
                    dropped.write(json.dumps(record, ensure_ascii=False) + "\n")
                    continue
                first_seen[row["_hash"]] = row["_where"]
                if kind == "preferences":  # three ways, by prompt (see preference_split)
                    writers[preference_split(row, cfg, seed)].add(row)
                    continue
                held_out = eval_name is not None and _bucket(row, seed) < cfg.eval_fraction
                writers[eval_name if held_out else train_name].add(row)
            for name, sink in writers.items():
                splits[name] = sink.close(kind)
            counts[kind] = {
                **data.counts.get(kind, {}),
                "validated": n_in,
                "after_dedupe": len(first_seen),
                **{name: splits[name].rows for name in names},
            }
    dropped_path.with_suffix(".tmp").replace(dropped_path)
    manifest = {
        "sources": data.sources,
        "seed": seed,
        "eval_fraction": cfg.eval_fraction,
        "judge_fraction": cfg.judge_fraction,
        "counts": counts,
        "dropped": dict(sorted(reasons.items())),
        "dropped_rows": {"path": dropped_path.name, "sha256": sha256_file(dropped_path)},
        "outputs": {
            k: {"path": Path(f.path).name, "rows": f.rows, "sha256": f.sha256} for k, f in splits.items()
        },
    }
    manifest_path = out_dir / "manifest.json"
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    log.info("built datasets: %s", {k: f.rows for k, f in splits.items()})
    return InstructionDataset(
        root=str(out_dir), splits=splits, manifest=str(manifest_path), dropped=dict(sorted(reasons.items()))
    )


def _lines(path: str | None) -> Iterator[str]:
    if path is None or not Path(path).exists():
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield line


def preference_split(row: dict, cfg: BuildSection, seed: int) -> str:
    """pref_eval, pref_judge or pref_train for a preference pair, by the stable hash of its prompt with
    case and whitespace normalised (as validation's duplicate check normalises): every pair on a prompt
    lands in one split, so the judge never trains on a prompt the proxy reward model saw (nor either on
    a held-out one). `cfg.judge_fraction` is a share of the pairs not held out."""
    prompt = [{"content": " ".join(m["content"].lower().split())} for m in row["prompt"]]
    u = _bucket({"prompt": prompt}, seed)
    if u < cfg.eval_fraction:
        return "pref_eval"
    judge_until = cfg.eval_fraction + (1 - cfg.eval_fraction) * cfg.judge_fraction
    return "pref_judge" if u < judge_until else "pref_train"


def _bucket(row: dict, seed: int) -> float:
    """A stable number in [0, 1) from the row's prompt: the same prompt always lands on the same side."""
    key = f"{seed}:" + " ".join(m["content"] for m in row["prompt"])
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


class _ParquetSink:
    """Rows to one Parquet file in row groups of ROW_GROUP, written to a temporary name and renamed."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path, self.schema = path, schema
        self.tmp = path.with_suffix(".tmp")
        self.writer = pq.ParquetWriter(self.tmp, schema, compression="zstd")
        self.buffer: list[dict] = []
        self.rows = 0

    def add(self, row: dict) -> None:
        self.buffer.append({name: row.get(name) for name in self.schema.names})
        if len(self.buffer) >= ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        if self.buffer:
            self.writer.write_table(pa.Table.from_pylist(self.buffer, schema=self.schema))
            self.rows += len(self.buffer)
            self.buffer = []

    def close(self, kind: str) -> DataFile:
        self._flush()
        self.writer.close()
        self.tmp.replace(self.path)
        return DataFile(kind=kind, path=str(self.path), rows=self.rows, sha256=sha256_file(self.path))
