"""Write the demo's data in public tools' formats, so one run exercises several readers and shapes.

The rows are the demo's own (data/generate.py `generate`, same seed, same rows in the same order),
generated text about a fictional company, released under Apache-2.0 like the rest of this project.
Only the layout changes. The script is seeded, so the same command always writes the same bytes:

    python data/public_formats.py --out data/public && tunegate run --config configs/public-formats.yaml

It writes four files:
- sft_sharegpt.jsonl         LLaMA-Factory / FastChat ShareGPT: `conversations` of {from, value} turns
                             (`system`, `human`, `gpt`). The system prompt is a `from: system` turn: the
                             validator reads ShareGPT SFT rows' turns only, and warns that a `system`
                             column would be left out.
- preferences_hh_rlhf.jsonl  Anthropic hh-rlhf transcripts: `chosen` and `rejected` strings of
                             `\\n\\nHuman: …\\n\\nAssistant: …`. hh-rlhf has no system prompt, so the
                             demo's is dropped here; configs/public-formats.yaml puts it back with
                             `model.system_prompt`, which is prepended to prompts that have none.
- prompts.json               the RL prompts as one JSON array (TRL's prompt-only rows with their checks)
- eval.jsonl.gz              the eval rows as gzipped JSON Lines (no timestamp in the gzip header)
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))  # run as a script from anywhere: data/generate.py beside it
from generate import generate  # noqa: E402

FILES = {
    "sft": "sft_sharegpt.jsonl",
    "preferences": "preferences_hh_rlhf.jsonl",
    "prompts": "prompts.json",
    "eval": "eval.jsonl.gz",
}
SHAREGPT_FROM = {"system": "system", "user": "human", "assistant": "gpt"}
HH_TAG = {"user": "Human", "assistant": "Assistant"}


def write_public_formats(out: Path, *, seed: int = 7, per_fact: int = 32) -> dict[str, int]:
    """Generate the demo's rows and write them under `out` in the formats above.

    Args:
        out: output directory, created if missing.
        seed: data/generate.py's seed (7 is the demo's).
        per_fact: SFT and preference rows per product fact (32 is the demo's).

    Returns:
        Rows written per kind.
    """
    rows = generate(seed, per_fact)
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / FILES["sft"], [to_sharegpt(r) for r in rows["sft"]])
    _write_jsonl(out / FILES["preferences"], [to_hh_rlhf(r) for r in rows["preferences"]])
    _write_bytes(
        out / FILES["prompts"], (json.dumps(rows["prompts"], ensure_ascii=False, indent=1) + "\n").encode()
    )
    # mtime=0 and no file name in the header: the same rows give the same bytes.
    _write_bytes(out / FILES["eval"], gzip.compress(_jsonl(rows["eval"]), mtime=0))
    return {kind: len(kind_rows) for kind, kind_rows in rows.items()}


def to_sharegpt(row: dict[str, Any]) -> dict[str, Any]:
    """A `messages` SFT row as a ShareGPT row: `{"conversations": [{"from": ..., "value": ...}, ...]}`."""
    return {
        "conversations": [{"from": SHAREGPT_FROM[m["role"]], "value": m["content"]} for m in row["messages"]]
    }


def to_hh_rlhf(row: dict[str, Any]) -> dict[str, str]:
    """An explicit-prompt preference row as an hh-rlhf pair: the prompt's turns (without its system
    message) followed by each answer, as `\\n\\nHuman: …\\n\\nAssistant: …` transcripts."""
    prompt = "".join(
        f"\n\n{HH_TAG[m['role']]}: {m['content']}" for m in row["prompt"] if m["role"] != "system"
    )
    return {
        side: prompt + "".join(f"\n\n{HH_TAG[m['role']]}: {m['content']}" for m in row[side])
        for side in ("chosen", "rejected")
    }


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    _write_bytes(path, _jsonl(rows))


def _write_bytes(path: Path, data: bytes) -> None:
    # Through a temporary file, so a reader never sees half a file.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "public")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--per-fact", type=int, default=32)
    args = parser.parse_args()
    counts = write_public_formats(args.out, seed=args.seed, per_fact=args.per_fact)
    print(", ".join(f"{FILES[k]}: {n} rows" for k, n in counts.items()), f"-> {args.out}")


if __name__ == "__main__":
    main()
