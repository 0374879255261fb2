"""What a run shows where people look: gate verdicts and the validation report as Prefect artifacts,
and in the stage's MLflow run the records, the evaluation, the datasets and the lineage of the data."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.gates import verdict_chart
from tunegate.artifacts import Artifact, EvalReport, GateVerdict, InstructionDataset, ValidatedData


def publish_verdict(verdict: GateVerdict, out_dir: Path | None, report: EvalReport | None = None) -> None:
    """The verdict as a Prefect markdown and table artifact, and in MLflow as markdown, JSON and a PNG
    chart (with the final evaluation's `report`, each gate's panel shows every model and each stage's gain)."""
    import tempfile

    key = "gate-verdict" if verdict.stage == "final" else f"gate-verdict-{verdict.stage}"
    name = "gates" if verdict.stage == "final" else f"gates-{verdict.stage}"
    create_markdown_artifact(
        key=key, markdown=verdict.markdown, description=f"Gate verdict ({verdict.stage})"
    )
    create_table_artifact(
        key=f"{key}-table",
        table=[
            {
                "gate": r.gate,
                "value": r.value,
                "interval": r.interval,
                "n": r.n,
                "baseline": r.reference if r.reference_value is not None else None,
                "baseline_value": r.reference_value,
                "required": r.required,
                "decided_on": r.decided_on,
                "passed": r.passed,
                "why": r.why,
            }
            for r in verdict.results
        ],
        description=f"Gate results ({verdict.stage})",
    )
    mlflow.log_text(verdict.markdown, f"{name}.md")
    mlflow.log_dict(verdict.model_dump(mode="json"), f"{name}.json")
    with tempfile.TemporaryDirectory() as tmp:
        chart = verdict_chart(verdict, (out_dir or Path(tmp)) / f"{name}.png", report)
        mlflow.log_artifact(str(chart))


def log_report(report) -> None:
    for label, scores in report.scores.items():
        mlflow.log_metrics({f"{label}.{k}": v for k, v in scores.items()})
        for metric, (lo, hi) in report.intervals.get(label, {}).items():
            mlflow.log_metrics({f"{label}.{metric}.ci_low": lo, f"{label}.{metric}.ci_high": hi})
    # What each stage added, paired on the same rows: gain.sft.<metric> (SFT model minus base) and
    # gain.alignment.<metric> (candidate minus SFT model), each with its interval.
    gains = {}
    for stage, by_metric in report.gains.items():
        for metric, (point, low, high) in by_metric.items():
            key = f"gain.{stage}.{metric}"
            gains.update({key: point, f"{key}.ci_low": low, f"{key}.ci_high": high})
    if gains:
        mlflow.log_metrics(gains)
    for task, settings in report.benchmarks.items():  # what each benchmark was scored with
        mlflow.log_params({f"bench.{task}.{k}": _param(v) for k, v in settings.items() if k != "task"})
    for path in (report.samples_path, report.per_row_path, report.llm_judge_path):
        if path and Path(path).exists():
            mlflow.log_artifact(path, "evaluation")


def _param(value):
    """An MLflow param value: a mapping with one entry (a task's own setting) as that value, other
    mappings and lists as JSON."""
    if isinstance(value, dict) and len(value) == 1:
        value = next(iter(value.values()))
    return json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else value


def log_record(record: Artifact) -> None:
    data = record.model_dump(mode="json")
    mlflow.log_dict(data, "record.json")
    metrics = data.get("metrics")
    if isinstance(metrics, dict):
        mlflow.log_metrics({f"final.{k}": v for k, v in metrics.items()})


def log_datasets(dataset: InstructionDataset, validated: ValidatedData) -> None:
    """Each split as an MLflow dataset input (source, digest, schema, row count) without loading it
    whole, plus the raw sources' digests, the build manifest and every dropped row with its reason."""
    import warnings

    import pyarrow.parquet as pq
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    for name, f in dataset.splits.items():
        parquet = pq.ParquetFile(f.path)
        head = next(parquet.iter_batches(batch_size=100), None)
        head = (head if head is not None else parquet.schema_arrow.empty_table()).to_pandas()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "can be interpreted in multiple ways": a local file either way
            source = resolve_dataset_source(str(Path(f.path).resolve()))
        ds = MetaDataset(source, name=name, digest=f.sha256[:16], schema=mlflow.data.from_pandas(head).schema)
        context = "eval" if name in ("sft_eval", "pref_eval", "eval") else "train"
        tags = {"rows": str(f.rows), "sha256": f.sha256, "validation_report": "validation/validation.json"}
        mlflow.log_input(ds, context=context, tags=tags)
    mlflow.log_dict(validated.sources, "data/sources.json")
    mlflow.log_artifact(dataset.manifest, "data")
    dropped = Path(dataset.manifest).with_name("dropped.jsonl")
    if dropped.exists():
        mlflow.log_artifact(str(dropped), "data")


def publish_report(path: Path, key: str) -> None:
    if path.exists():
        text = path.read_text(encoding="utf-8")
        create_markdown_artifact(key=key, markdown=text, description="Data validation report")
        mlflow.log_text(text, "validation/validation.md")
        json_path = path.with_suffix(".json")
        if json_path.exists():
            mlflow.log_dict(json.loads(json_path.read_text()), "validation/validation.json")
