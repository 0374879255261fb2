"""Stage 8: register a passing candidate in the MLflow model registry and move the champion alias.

The alias moves by compare-and-set: only if the champion is still the version this run compared
against. Anything else ends as not promoted, with the reason, and the champion untouched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from tunegate.artifacts import GateVerdict, ModelArtifact, Registration
from tunegate.config import RegistrySection
from tunegate.errors import PromotionError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Champion:
    version: str
    run_id: str | None


def current_champion(cfg: RegistrySection) -> Champion | None:
    """The version the alias points at now, or None (no registered model or no alias yet)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=cfg.tracking_uri, registry_uri=cfg.tracking_uri)
    try:
        mv = client.get_model_version_by_alias(cfg.model_name, cfg.alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise
    return Champion(version=str(mv.version), run_id=mv.run_id)


def fetch_champion(cfg: RegistrySection, champion: Champion, out_dir: Path) -> Path:
    """Load `models:/NAME@alias` through MLflow's transformers flavor and save it as a local directory."""
    import mlflow

    target = out_dir / f"champion-v{champion.version}"
    if (target / "config.json").exists():
        return target
    mlflow.set_tracking_uri(cfg.tracking_uri)
    components = mlflow.transformers.load_model(
        f"models:/{cfg.model_name}/{champion.version}", return_type="components"
    )
    target.mkdir(parents=True, exist_ok=True)
    components["model"].save_pretrained(target)
    components["tokenizer"].save_pretrained(target)
    return target


def register_candidate(
    cfg: RegistrySection,
    candidate: ModelArtifact,
    verdict: GateVerdict,
    *,
    expected_champion: str | None,
    tags: dict[str, str],
) -> Registration:
    """Log the candidate in the active MLflow run, register it, and move the alias by compare-and-set.

    Raises:
        PromotionError: called with a failing verdict (a programming error: nothing is registered).
    """
    import mlflow
    from mlflow import MlflowClient

    if not verdict.passed:
        raise PromotionError("refusing to register a candidate whose gate verdict failed")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Components, not the checkpoint path: MLflow's local-checkpoint path breaks on transformers 5's
    # lazily named pipeline classes (flavor_config reads `impl.__name__` from a string).
    components = {
        "model": AutoModelForCausalLM.from_pretrained(candidate.path),
        "tokenizer": AutoTokenizer.from_pretrained(candidate.path),
    }
    info = mlflow.transformers.log_model(
        transformers_model=components,
        task="text-generation",
        name="model",
        pip_requirements=_requirements(),
        tags={"tunegate.digest": candidate.digest},
    )
    client = MlflowClient(tracking_uri=cfg.tracking_uri, registry_uri=cfg.tracking_uri)
    mv = mlflow.register_model(info.model_uri, cfg.model_name, tags=tags)
    now = current_champion(cfg)
    now_version = now.version if now else None
    if now_version != expected_champion:
        reason = (
            f"champion moved from {expected_champion or 'none'} to {now_version} during this run; "
            f"version {mv.version} registered without the {cfg.alias!r} alias"
        )
        log.warning(reason)
        return Registration(promoted=False, model_name=cfg.model_name, version=str(mv.version), reason=reason)
    client.set_registered_model_alias(cfg.model_name, cfg.alias, mv.version)
    aliases = [cfg.alias]
    if now_version is not None:
        client.set_registered_model_alias(cfg.model_name, "previous", now_version)
    log.info("registered %s version %s as %s", cfg.model_name, mv.version, cfg.alias)
    return Registration(
        promoted=True,
        model_name=cfg.model_name,
        version=str(mv.version),
        aliases=aliases,
        reason="all gates passed",
    )


def _requirements() -> list[str]:
    from importlib.metadata import version

    # Inference would import torchvision to guess these, which has no CPU build here: name them.
    return [
        f"{p}=={version(p).split('+')[0]}" for p in ("torch", "transformers", "accelerate", "safetensors")
    ]
