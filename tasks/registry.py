"""Stage 8: register a passing candidate and promote it; keep a failing one for audit.

A passing candidate becomes a new registered version. Under the model's promotion lock it gets the
`challenger` alias, is smoke-tested by loading `models:/NAME@challenger` through MLflow and generating,
and only then takes the champion alias, and only if the champion is still the version this run
compared against (compare-and-set). The old champion becomes `previous`. Anything else ends as not
promoted, with the reason, and the champion untouched. A failing candidate is logged as a model in the
run (for audit) but never registered. `rollback` puts `previous` back.

The lock is passed in (`lock`, a factory of context managers): the flow supplies a file lock beside
a local store or a Prefect global concurrency limit for a remote tracking server
(`flows/locks.py`), so two runs finishing together cannot both promote. Without one, only a local
store's file lock is available here; orchestration stays out of this layer.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

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
    from mlflow.exceptions import MlflowException

    client = _client(cfg)
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
    smoke_prompt: list[dict] | None = None,
    lock: Lock | None = None,
) -> Registration:
    """Log the candidate in the active MLflow run; if its verdict passed, register and promote it.

    Never raises for a lost race or a failed smoke test: the Registration says why it was not promoted.
    """
    import mlflow

    if verdict.passed:
        lock = lock or local_promotion_lock(cfg)  # before anything is written: a remote store needs one
    info = _log_model(candidate)
    if not verdict.passed:
        failed = ", ".join(r.gate for r in verdict.results if not r.passed)
        mlflow.set_tag("tunegate.audit_model_uri", info.model_uri)
        return Registration(
            promoted=False,
            model_name=cfg.model_name,
            reason=f"gates failed: {failed}; the candidate is logged for audit ({info.model_uri}), not registered",
        )
    client = _client(cfg)
    mv = mlflow.register_model(info.model_uri, cfg.model_name, tags=tags)
    version = str(mv.version)
    with lock():
        client.set_registered_model_alias(cfg.model_name, CHALLENGER, version)
        problem = smoke_test(cfg, smoke_prompt)
        if problem is not None:
            client.delete_registered_model_alias(cfg.model_name, CHALLENGER)
            reason = f"smoke test of models:/{cfg.model_name}@{CHALLENGER} failed: {problem}"
            return _not_promoted(cfg, version, reason)
        now = current_champion(cfg)
        now_version = now.version if now else None
        if now_version != expected_champion:
            client.delete_registered_model_alias(cfg.model_name, CHALLENGER)
            reason = (
                f"champion moved from {expected_champion or 'none'} to {now_version} while this run was "
                f"evaluating; version {version} is registered without the {cfg.alias!r} alias"
            )
            return _not_promoted(cfg, version, reason)
        client.set_registered_model_alias(cfg.model_name, cfg.alias, version)
        if now_version is not None:
            client.set_registered_model_alias(cfg.model_name, PREVIOUS, now_version)
        client.delete_registered_model_alias(cfg.model_name, CHALLENGER)
    log.info("registered %s version %s as %s", cfg.model_name, version, cfg.alias)
    return Registration(
        promoted=True,
        model_name=cfg.model_name,
        version=version,
        aliases=[cfg.alias],
        reason="all gates passed; smoke test passed",
    )


CHALLENGER, PREVIOUS = "challenger", "previous"


def smoke_test(cfg: RegistrySection, prompt: list[dict] | None) -> str | None:
    """Load `models:/NAME@challenger` through MLflow, check its logits are finite and that it generates;
    None when it does, else why not."""
    import mlflow
    import torch

    prompt = prompt or [{"role": "user", "content": "Hello!"}]
    try:
        mlflow.set_tracking_uri(cfg.tracking_uri)
        parts = mlflow.transformers.load_model(
            f"models:/{cfg.model_name}@{CHALLENGER}", return_type="components"
        )
        model, tokenizer = parts["model"], parts["tokenizer"]
        enc = tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            if not torch.isfinite(model(**enc).logits).all():
                return "non-finite logits"
            out = model.generate(
                **enc, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.eos_token_id
            )
    except Exception as exc:  # noqa: BLE001 - any failure to load or generate is the finding
        return f"{type(exc).__name__}: {exc}"[:300]
    return None if out.shape[1] > enc["input_ids"].shape[1] else "it generated no tokens"


def rollback(cfg: RegistrySection, lock: Lock | None = None) -> Registration:
    """Point the champion alias back at `previous`; the demoted version becomes `previous`.

    Raises:
        PromotionError: there is no `previous` version to go back to.
    """
    lock = lock or local_promotion_lock(cfg)
    client = _client(cfg)
    with lock():
        try:
            back = str(client.get_model_version_by_alias(cfg.model_name, PREVIOUS).version)
        except Exception as exc:  # noqa: BLE001 - MLflow raises its generic error for a missing alias
            raise PromotionError(f"{cfg.model_name} has no {PREVIOUS!r} version to roll back to") from exc
        now = current_champion(cfg)
        client.set_registered_model_alias(cfg.model_name, cfg.alias, back)
        if now is not None:
            client.set_registered_model_alias(cfg.model_name, PREVIOUS, now.version)
            client.set_model_version_tag(cfg.model_name, now.version, "tunegate.rolled_back", "true")
    log.info("%s: %s now points at version %s", cfg.model_name, cfg.alias, back)
    return Registration(
        promoted=True,
        model_name=cfg.model_name,
        version=back,
        aliases=[cfg.alias],
        reason=f"rolled back from version {now.version if now else 'none'}",
    )


Lock = Callable[[], contextlib.AbstractContextManager]


def local_promotion_lock(cfg: RegistrySection, timeout_s: float = 600) -> Lock:
    """A file lock for alias moves on one registered model in a local store, across processes.

    Raises:
        PromotionError: the store is remote; its lock must come from the orchestrator.
    """
    local = local_store(cfg)
    if local is None:
        raise PromotionError(
            f"{cfg.tracking_uri} is a remote store: promotion needs a cross-process lock from the flow "
            "(flows/locks.py), not a local file lock"
        )
    return lambda: _file_lock(local, f"{cfg.model_name}.promote", timeout_s)


@contextlib.contextmanager
def store_setup_lock(cfg: RegistrySection, timeout_s: float = 300) -> Iterator[None]:
    """Serialise the first use of a local store: MLflow creates and migrates a new sqlite database on
    first contact, and two processes doing that at once fail."""
    local = local_store(cfg)
    if local is None:
        yield
        return
    with _file_lock(local, "setup", timeout_s):
        yield


def local_store(cfg: RegistrySection) -> Path | None:
    parsed = urlparse(cfg.tracking_uri)
    if parsed.scheme == "sqlite":
        return Path(parsed.path)
    if parsed.scheme in ("file", ""):
        return Path(parsed.path if parsed.scheme else cfg.tracking_uri)
    return None


@contextlib.contextmanager
def _file_lock(store: Path, purpose: str, timeout_s: float) -> Iterator[None]:
    from filelock import FileLock

    store.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(store.parent / f".{store.name}.{purpose}.lock"), timeout=timeout_s):
        yield


def _not_promoted(cfg: RegistrySection, version: str, reason: str) -> Registration:
    log.warning(reason)
    return Registration(promoted=False, model_name=cfg.model_name, version=version, reason=reason)


def _client(cfg: RegistrySection):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=cfg.tracking_uri, registry_uri=cfg.tracking_uri)


def _log_model(candidate: ModelArtifact):
    """The candidate as an MLflow transformers model in the active run."""
    import mlflow
    from transformers import AutoTokenizer

    from tasks.training import load_causal_lm

    # Components, not the checkpoint path: MLflow's local-checkpoint path breaks on transformers 5's
    # lazily named pipeline classes (flavor_config reads `impl.__name__` from a string).
    model, _ = load_causal_lm(candidate.path)
    components = {"model": model, "tokenizer": AutoTokenizer.from_pretrained(candidate.path)}
    return mlflow.transformers.log_model(
        transformers_model=components,
        task="text-generation",
        name="model",
        pip_requirements=_requirements(),
        tags={"tunegate.digest": candidate.digest},
    )


def _requirements() -> list[str]:
    from importlib.metadata import version

    # Inference would import torchvision to guess these, which has no CPU build here: name them.
    return [
        f"{p}=={version(p).split('+')[0]}" for p in ("torch", "transformers", "accelerate", "safetensors")
    ]
