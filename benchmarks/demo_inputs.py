"""What the training benchmarks start from: the packaged base model and the demo's generated data
(`make data`), validated and built into splits as the pipeline builds them."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def demo_inputs(work: Path):
    """(base model artifact, instruction dataset) for the demo's data, built under `work`."""
    from tasks.base_model import prepare_base_model
    from tasks.build import build_datasets
    from tasks.validate import validate_data
    from tunegate.config import BuildSection, DataSection, ModelSection, ValidateSection

    base = prepare_base_model(ModelSection())
    files = {
        k: str(ROOT / "data" / "generated" / f"{k}.jsonl") for k in ("sft", "preferences", "prompts", "eval")
    }
    validated = validate_data(
        ValidateSection(max_length=256), DataSection(**files), base, out_dir=work / "validate"
    )
    return base, build_datasets(BuildSection(), validated, out_dir=work / "dataset", seed=42)
