"""Stage 2: build the instruction datasets (TRL formats) from validated data.

Dedupe on normalised text, split train/eval by a stable seeded hash (a row never changes side when
others are added), write Parquet plus a manifest of sources, counts, drops and output digests.
Re-running on the same inputs gives byte-identical outputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data_checks.formats import conversation_text
from tunegate.artifacts import DataFile, InstructionDataset, ValidatedData, sha256_file
from tunegate.config import BuildSection

log = logging.getLogger(__name__)


def build_datasets(cfg: BuildSection, data: ValidatedData, *, out_dir: Path, seed: int) -> InstructionDataset:
    """Write sft_train/sft_eval, pref_train/pref_eval, prompts and eval splits as Parquet."""
    out_dir.mkdir(parents=True, exist_ok=True)
    splits: dict[str, DataFile] = {}
    counts: dict[str, dict[str, int]] = {}
    dropped: dict[str, int] = {}
    for kind, train_name, eval_name in (
        ("sft", "sft_train", "sft_eval"),
        ("preferences", "pref_train", "pref_eval"),
        ("prompts", "prompts", None),
        ("eval", "eval", None),
    ):
        rows = _read(Path(data.files[kind].path))
        unique = _dedupe(rows)
        dropped[f"{kind}_duplicates"] = len(rows) - len(unique)
        if eval_name is None:
            parts = {train_name: unique}
        else:
            held = [r for r in unique if _bucket(r, seed) < cfg.eval_fraction]
            parts = {
                train_name: [r for r in unique if _bucket(r, seed) >= cfg.eval_fraction],
                eval_name: held,
            }
        counts[kind] = {
            "validated": len(rows),
            "after_dedupe": len(unique),
            **{k: len(v) for k, v in parts.items()},
        }
        for name, part in parts.items():
            path = out_dir / f"{name}.parquet"
            _write_parquet(part, path)
            splits[name] = DataFile(kind=kind, path=str(path), rows=len(part), sha256=sha256_file(path))
    manifest = {
        "sources": {k: {"path": f.path, "rows": f.rows, "sha256": f.sha256} for k, f in data.files.items()},
        "seed": seed,
        "eval_fraction": cfg.eval_fraction,
        "counts": counts,
        "dropped": dropped,
        "outputs": {
            k: {"path": Path(f.path).name, "rows": f.rows, "sha256": f.sha256} for k, f in splits.items()
        },
    }
    manifest_path = out_dir / "manifest.json"
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    log.info("built datasets: %s", {k: f.rows for k, f in splits.items()})
    return InstructionDataset(root=str(out_dir), splits=splits, manifest=str(manifest_path), dropped=dropped)


def _read(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _dedupe(rows: list[dict]) -> list[dict]:
    seen, out = set(), []
    for row in rows:
        key = " ".join(conversation_text(row).lower().split())
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


def _bucket(row: dict, seed: int) -> float:
    """A stable number in [0, 1) from the row's prompt: the same prompt always lands on the same side."""
    key = f"{seed}:" + " ".join(m["content"] for m in row["prompt"])
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def _write_parquet(rows: list[dict], path: Path) -> None:
    clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    table = pa.Table.from_pylist(clean) if clean else pa.table({})
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(path)
