"""Small frozen records that stages pass to each other: paths, digests, counts and metrics.

Never DataFrames or models: that keeps stages cacheable by content, resumable, and movable.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Artifact(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataFile(Artifact):
    kind: str
    path: str
    rows: int
    sha256: str


class ValidatedData(Artifact):
    files: dict[str, DataFile] = Field(description="kind -> kept rows, normalised to TRL's format (JSONL)")
    dropped: dict[str, str] = Field(
        default_factory=dict, description="kind -> JSONL of rows dropped by policy, with the reason"
    )
    counts: dict[str, dict[str, int]] = Field(
        default_factory=dict, description="kind -> rows read, valid, kept"
    )
    sources: dict[str, str] = Field(default_factory=dict, description="raw input file -> sha256")
    report_json: str
    report_markdown: str
    warnings: int = 0


class InstructionDataset(Artifact):
    root: str
    splits: dict[str, DataFile] = Field(
        description="sft_train, sft_eval, pref_train, pref_judge (with a judge), pref_eval, prompts, eval"
    )
    manifest: str
    dropped: dict[str, int] = Field(default_factory=dict)


class ModelArtifact(Artifact):
    path: str
    role: Literal["base", "sft", "reward", "judge", "align", "champion"]
    base_model: str = Field(description="Identity of the model this one started from.")
    digest: str
    metrics: dict[str, float] = Field(default_factory=dict)
    steps: int = 0
    trust_remote_code: bool = Field(
        False,
        description=(
            "Loading it may run code shipped with it (`model.trust_remote_code`); a model trained from "
            "this one inherits it. Travels with the record to launched processes and pool workers."
        ),
    )
    chat_template: str | None = Field(
        None,
        description=(
            "The chat template to load it with instead of its own (`model.chat_template`, as text); "
            "None: its own. A model trained from this one saves it with its tokenizer."
        ),
    )


class EvalReport(Artifact):
    scores: dict[str, dict[str, float]] = Field(description="model label -> metric -> value")
    intervals: dict[str, dict[str, list[float]]] = Field(
        default_factory=dict,
        description="model label -> metric -> [low, high] confidence interval (method in `methods`)",
    )
    deltas: dict[str, dict[str, list[float]]] = Field(
        default_factory=dict,
        description="baseline label -> metric -> [low, high] interval of candidate minus baseline (paired)",
    )
    methods: dict[str, dict[str, str]] = Field(
        default_factory=dict,
        description=(
            "model label -> metric -> how its interval was computed: `wilson`, `wilson (ties as half)`, "
            "`bca-bootstrap` (see tasks/intervals.py)"
        ),
    )
    delta_methods: dict[str, dict[str, str]] = Field(
        default_factory=dict,
        description=(
            "baseline label -> metric -> how `deltas` was computed: `newcombe-paired`, `paired-bca-bootstrap`"
        ),
    )
    gains: dict[str, dict[str, list[float]]] = Field(
        default_factory=dict,
        description=(
            "what each stage added, paired on the same rows: `sft` (SFT model minus base) and `alignment` "
            "(candidate minus SFT model) -> metric -> [difference, low, high]"
        ),
    )
    gain_methods: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="stage -> metric -> how the interval in `gains` was computed"
    )
    counts: dict[str, dict[str, int]] = Field(
        default_factory=dict, description="model label -> metric -> rows it was measured on"
    )
    confidence: float = 0.95
    n_prompts: int
    sets: dict[str, int] = Field(default_factory=dict, description="eval set -> rows")
    samples_path: str
    per_row_path: str | None = None
    llm_judge_path: str | None = None  # the LLM judge's verdicts and rationales (`evaluate.llm_judge`)
    champion_version: str | None = None
    benchmarks: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description=(
            "benchmark task -> what it was scored with (`evaluate.benchmarks`): task, include_path, "
            "limit, num_fewshot (per task of a group, as lm-eval applied it), apply_chat_template, the "
            "lm-eval version, the task versions, rows, metrics, and `task_hashes` (model label -> "
            "lm-eval's hash of the rows, prompts and targets scored)"
        ),
    )


class GateResult(Artifact):
    gate: str
    stage: str = "final"
    metric: str
    op: str
    value: float | None
    interval: list[float] | None = Field(
        None,
        description=(
            "confidence interval of what the gate compares: the value's own (threshold), or the "
            "baseline's value plus the paired difference's interval (baseline)"
        ),
    )
    decided_on: float | None = Field(
        None, description="what was compared with `required`: the value, or an interval bound"
    )
    n: int | None = Field(None, description="rows the value was measured on")
    method: str | None = Field(None, description="how `interval` was computed (`EvalReport.methods`)")
    rows_needed: int | None = Field(
        None,
        description=(
            "power warning: about how many rows would let the interval exclude `required` "
            "(tasks/gates.py, `power_warning`); None when n suffices or there is no interval"
        ),
    )
    reference: str
    reference_value: float | None
    required: float | None
    passed: bool
    why: str


class GateVerdict(Artifact):
    stage: str = "final"
    passed: bool
    results: list[GateResult]
    markdown: str
    warnings: list[str] = Field(
        default_factory=list, description="gates whose rows are too few to support their decision; no failure"
    )


class Registration(Artifact):
    promoted: bool
    model_name: str
    version: str | None = None
    aliases: list[str] = Field(default_factory=list)
    reason: str = ""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# Written into model directories by tunegate before 0.2 (now the digest lives in tunegate's cache): not
# part of a model's content.
DIGEST_FILE = ".tunegate-digest"


def sha256_dir(path: str | Path) -> str:
    """Digest of a directory: every file's relative name and content, in sorted order."""
    root = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.name != DIGEST_FILE):
        h.update(str(f.relative_to(root)).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


# Beside an adapter: the record of the model it was trained on (path, digest, origin).
BASE_REF = "tunegate_base.json"


def base_of(adapter_dir: str | Path) -> ModelArtifact | None:
    """The model an adapter directory was trained on, or None for full weights.

    Found at its recorded path, else beside the adapter under its digest: where a copy fetched from
    a shared artifact root keeps it (see `tunegate.artifact_store`), on a machine where the path it
    was trained from does not exist."""
    ref = Path(adapter_dir) / BASE_REF
    if not ref.is_file():
        return None
    base = ModelArtifact.model_validate_json(ref.read_text(encoding="utf-8"))
    beside = Path(adapter_dir).parent / base.digest
    if not Path(base.path).exists() and beside.is_dir():
        return base.model_copy(update={"path": str(beside)})
    return base
