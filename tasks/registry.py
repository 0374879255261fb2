"""Stage 8: register a passing candidate and promote it; keep a failing one for audit.

A passing candidate becomes a new registered version. Under the model's promotion lock it gets the
`challenger` alias, is smoke-tested by loading `models:/NAME@challenger` through MLflow and generating,
and only then takes the champion alias, and only if the champion is still the version this run
compared against (compare-and-set). The old champion becomes `previous`. Anything else ends as not
promoted, with the reason, and the champion untouched. A failing candidate is logged as a model in the
run (for audit) but never registered. `rollback` puts `previous` back.

What a version holds follows `registry.format`: full weights (`merged`), or the adapter alone with a
reference to the local full-weights model it applies to (`adapter`; MLflow's `base_model_path`), so
the artifact is adapter-sized and `mlflow.transformers.load_model` applies it on load. Every logged
model, registered or kept for audit, carries a generated model card (README.md in its artifacts, and
the registered version's description), and serves with `mlflow models serve`: a request is a user
message, the chat template is applied, and the answer alone comes back.

The lock is passed in (`lock`, a factory of context managers; by default `promotion_lock(cfg)` from
tasks/promotion_lock.py): a file lock beside a local store, a lease held in the tracking server for a
remote one, so two runs finishing together cannot both promote even when nothing but the tracking
server is shared between them. Under it the champion is read and moved; the compare and the set are
one step because no other run can move an alias meanwhile, and a run whose lease lapsed (another may
have taken the lock) does not move it.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tasks.model_card import description, model_card
from tasks.model_io import is_adapter
from tasks.promotion_lock import Lease, Lock, LockHeld, promotion_lock
from tunegate.artifacts import BASE_REF, GateVerdict, ModelArtifact, Registration, base_of
from tunegate.config import RegistrySection
from tunegate.errors import ConfigError, PromotionError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Champion:
    version: str
    run_id: str | None
    digest: str | None = None  # the registered candidate's weights digest (tag tunegate.candidate_digest)
    data_digest: str | None = None  # the raw data it was trained on (tag tunegate.data_digest)


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
    tags = mv.tags or {}
    return Champion(
        version=str(mv.version),
        run_id=mv.run_id,
        digest=tags.get("tunegate.candidate_digest"),
        data_digest=tags.get("tunegate.data_digest"),
    )


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
    model = components["model"]
    if hasattr(model, "merge_and_unload"):  # an adapter version: evaluation wants one plain model
        model = model.merge_and_unload()
    model.save_pretrained(target)
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
    """Log the candidate, with its model card, in the active MLflow run; if its verdict passed,
    register and promote it.

    Never raises for a lost race, a promotion lock held past its timeout or a failed smoke test: the
    Registration says why it was not promoted.

    Raises:
        ConfigError: `registry.format: adapter` with a candidate that is not an adapter on full weights.
        PromotionError: the adapter's base model directory is gone.
    """
    import mlflow

    # The check comes before anything is written: nothing half-logged on a config mistake.
    base = adapter_base(candidate) if cfg.format == "adapter" else None
    stages, data = _lineage(cfg, candidate, tags)
    card = model_card(cfg, candidate, verdict, tags, adapter_base=base, stages=stages, data=data)
    info = _log_model(cfg, candidate, base, card)
    if not verdict.passed:
        failed = ", ".join(r.gate for r in verdict.results if not r.passed)
        mlflow.set_tag("tunegate.audit_model_uri", info.model_uri)
        return Registration(
            promoted=False,
            model_name=cfg.model_name,
            reason=f"gates failed: {failed}; the candidate is logged for audit ({info.model_uri}), not registered",
        )
    try:
        with (lock or promotion_lock(cfg))() as lease:
            return _register_and_promote(
                cfg, info.model_uri, candidate, base, card, tags, smoke_prompt, expected_champion, lease
            )
    except LockHeld as exc:
        reason = f"{exc}; the candidate is logged in its run ({info.model_uri}), not registered: run again"
        log.warning(reason)
        return Registration(promoted=False, model_name=cfg.model_name, reason=reason)


def _register_and_promote(
    cfg: RegistrySection,
    model_uri: str,
    candidate: ModelArtifact,
    base: ModelArtifact | None,
    card: str,
    tags: dict[str, str],
    smoke_prompt: list[dict] | None,
    expected_champion: str | None,
    lease: Lease | None,
) -> Registration:
    """The part under the promotion lock: register (or finish a pending version), smoke-test it as
    `challenger`, and move the champion alias only if it still points at `expected_champion`."""
    import mlflow

    client = _client(cfg)
    # A version stays `pending` until its promotion is decided: one whose registration was cut
    # short (the tracking server gone, the process killed) is finished by the next run with the
    # same candidate, never registered twice, and never left half-done for anyone to serve.
    version = _pending_version(client, cfg, candidate.digest, tags.get("tunegate.parent_run_id"))
    if version is None:
        all_tags = {**tags, **_format_tags(cfg, base), REGISTRATION: PENDING}
        version = str(mlflow.register_model(model_uri, cfg.model_name, tags=all_tags).version)
    client.update_model_version(cfg.model_name, version, description=description(card))
    client.set_registered_model_alias(cfg.model_name, CHALLENGER, version)
    problem = smoke_test(cfg, smoke_prompt)
    now = current_champion(cfg) if problem is None else None
    now_version = now.version if now else None
    # Last, right before the move: a lease that lapsed means another run may hold the lock now.
    lost = lease.lost() if lease is not None and problem is None else None
    reason = None
    if problem is not None:
        reason = f"smoke test of models:/{cfg.model_name}@{CHALLENGER} failed: {problem}"
    elif now_version != expected_champion:
        reason = (
            f"champion moved from {expected_champion or 'none'} to {now_version} while this run was "
            f"evaluating; version {version} is registered without the {cfg.alias!r} alias"
        )
    elif lost is not None:
        reason = f"{lost}; version {version} is registered without the {cfg.alias!r} alias: run again"
    if reason is not None:
        client.delete_registered_model_alias(cfg.model_name, CHALLENGER)
        client.set_model_version_tag(cfg.model_name, version, REGISTRATION, COMPLETE)
        return _not_promoted(cfg, version, reason)
    client.set_registered_model_alias(cfg.model_name, cfg.alias, version)
    if now_version is not None:
        client.set_registered_model_alias(cfg.model_name, PREVIOUS, now_version)
    client.delete_registered_model_alias(cfg.model_name, CHALLENGER)
    client.set_model_version_tag(cfg.model_name, version, REGISTRATION, COMPLETE)
    log.info("registered %s version %s as %s", cfg.model_name, version, cfg.alias)
    return Registration(
        promoted=True,
        model_name=cfg.model_name,
        version=version,
        aliases=[cfg.alias],
        reason="all gates passed; smoke test passed",
    )


CHALLENGER, PREVIOUS = "challenger", "previous"
REGISTRATION, PENDING, COMPLETE = "tunegate.registration", "pending", "complete"


def _pending_version(client, cfg: RegistrySection, digest: str, run_id: str | None) -> str | None:
    """The version of this very candidate (same weights digest) whose registration an earlier run
    began and never finished; it is finished now instead of registering the candidate again."""
    for mv in client.search_model_versions(f"name='{cfg.model_name}'"):
        mv_tags = mv.tags or {}
        if mv_tags.get(REGISTRATION) == PENDING and mv_tags.get("tunegate.candidate_digest") == digest:
            log.warning(
                "version %s of %s holds this candidate but its registration by run %s never finished; "
                "finishing it",
                mv.version,
                cfg.model_name,
                mv_tags.get("tunegate.parent_run_id", "?"),
            )
            if run_id:
                client.set_model_version_tag(
                    cfg.model_name, mv.version, "tunegate.completed_by_run_id", run_id
                )
            return str(mv.version)
    return None


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


def adapter_base(candidate: ModelArtifact) -> ModelArtifact:
    """The full-weights model the candidate adapter applies to, from its `tunegate_base.json`.

    Raises:
        ConfigError: the candidate is not an adapter, or its base is itself an adapter.
        PromotionError: the base model's directory is no longer there.
    """
    path = Path(candidate.path)
    if not is_adapter(path):
        raise ConfigError(
            [
                f"registry.format=adapter needs an adapter candidate, but {path} holds full weights; set "
                "align.save: adapter (with align.mode lora, dora or qlora), or registry.format: merged"
            ]
        )
    if (base := base_of(path)) is None:
        raise ConfigError(
            [f"registry.format=adapter: {path} has no {BASE_REF}, so the model it applies to is unknown"]
        )
    if is_adapter(base.path):
        fix = f"set {base.role}.save: merged" if base.role in ("sft", "align") else "use full weights"
        raise ConfigError(
            [
                f"registry.format=adapter: the candidate adapter was trained on {base.path}, itself an "
                f"adapter, and MLflow can reference only a full-weights base; {fix}, or registry.format: "
                "merged"
            ]
        )
    if not (Path(base.path) / "config.json").is_file():
        raise PromotionError(
            f"the adapter's base model {base.path} (digest {base.digest[:16]}) is gone; it must stay in "
            "place for the adapter to load, so this candidate cannot be registered as an adapter"
        )
    return base


def _format_tags(cfg: RegistrySection, base: ModelArtifact | None) -> dict[str, str]:
    tags = {"tunegate.format": cfg.format}
    if base is not None:
        tags |= {
            "tunegate.adapter_base.path": base.path,
            "tunegate.adapter_base.digest": base.digest,
            "tunegate.adapter_base.origin": base.base_model,
            "tunegate.adapter_base.role": base.role,
        }
    return tags


_STAGES = ("base-model", "sft", "reward-model", "align")


def _lineage(
    cfg: RegistrySection, candidate: ModelArtifact, tags: dict[str, str]
) -> tuple[list[ModelArtifact], dict[str, int] | None]:
    """The models that led to the candidate, first stage first, and the rows of each dataset split:
    from the pipeline run's stage records and dataset inputs when `tags` names that run, else the
    candidate's own chain of base references (and no data)."""
    parent = tags.get("tunegate.parent_run_id")
    if not parent:
        return _base_chain(candidate), None
    client = _client(cfg)
    run = client.get_run(parent)
    data = {}
    for d in run.inputs.dataset_inputs if run.inputs else []:
        rows = next((t.value for t in d.tags if t.key == "rows"), None)
        if rows is not None:
            data[d.dataset.name] = int(rows)
    children = client.search_runs(
        [run.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent}'",
        order_by=["attributes.start_time ASC"],
    )
    stages = []
    for child in children:
        if child.data.tags.get("tunegate.stage") not in _STAGES:
            continue
        if "record.json" not in {f.path for f in client.list_artifacts(child.info.run_id)}:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            record = Path(client.download_artifacts(child.info.run_id, "record.json", tmp))
            stages.append(ModelArtifact.model_validate_json(record.read_text(encoding="utf-8")))
    if not stages or stages[-1].digest != candidate.digest:
        stages.append(candidate)
    return stages, data or None


def _base_chain(candidate: ModelArtifact) -> list[ModelArtifact]:
    chain = [candidate]
    while (base := base_of(chain[-1].path)) is not None:
        chain.append(base)
    return chain[::-1]


def rollback(cfg: RegistrySection, lock: Lock | None = None) -> Registration:
    """Point the champion alias back at `previous`; the demoted version becomes `previous`.

    Raises:
        PromotionError: there is no `previous` version to go back to; LockHeld (a PromotionError):
            another run held the promotion lock for the whole timeout.
    """
    client = _client(cfg)
    with (lock or promotion_lock(cfg))():
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


def _not_promoted(cfg: RegistrySection, version: str, reason: str) -> Registration:
    log.warning(reason)
    return Registration(promoted=False, model_name=cfg.model_name, version=version, reason=reason)


def _client(cfg: RegistrySection):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=cfg.tracking_uri, registry_uri=cfg.tracking_uri)


def _log_model(cfg: RegistrySection, candidate: ModelArtifact, base: ModelArtifact | None, card: str):
    """The candidate as an MLflow transformers model in the active run, its card as README.md."""
    import mlflow
    from huggingface_hub import ModelCard
    from transformers import AutoTokenizer

    # Components, not the checkpoint path: MLflow's local-checkpoint path breaks on transformers 5's
    # lazily named pipeline classes (flavor_config reads `impl.__name__` from a string).
    tokenizer = AutoTokenizer.from_pretrained(candidate.path, trust_remote_code=candidate.trust_remote_code)
    info = mlflow.transformers.log_model(
        transformers_model={"model": _load_for_logging(candidate, base), "tokenizer": tokenizer},
        task="text-generation",
        name="model",
        pip_requirements=_requirements(adapter=base is not None),
        # A card of our own also keeps MLflow from asking the Hugging Face Hub for one.
        model_card=ModelCard(card),
        prompt_template=_chat_prompt_template(tokenizer),
        signature=_serving_signature(),
        base_model_path=base.path if base else None,
        tags={"tunegate.digest": candidate.digest, **_format_tags(cfg, base)},
    )
    with tempfile.TemporaryDirectory() as tmp:
        readme = Path(tmp) / "README.md"
        readme.write_text(card, encoding="utf-8")
        _client(cfg).log_model_artifact(info.model_id, str(readme))
    return info


def _load_for_logging(candidate: ModelArtifact, base: ModelArtifact | None):
    """Merged weights (an adapter merged onto its base), or the adapter as a PeftModel on its base."""
    from tasks.model_io import load_causal_lm
    from tasks.training import on_cuda

    if base is None:
        return load_causal_lm(candidate.path, trust_remote_code=candidate.trust_remote_code)[0]
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if on_cuda() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        base.path, dtype=dtype, attn_implementation="sdpa", trust_remote_code=candidate.trust_remote_code
    )
    return PeftModel.from_pretrained(model, candidate.path)


def _chat_prompt_template(tokenizer) -> str | None:
    """The chat template around one user message, as MLflow's `{prompt}` template: a served request
    is a user message, formatted as in training, evaluation and the smoke test."""
    if not tokenizer.chat_template:
        return None
    marker = "\x00tunegate-prompt\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": marker}], add_generation_prompt=True, tokenize=False
    )
    return text.replace("{", "{{").replace("}", "}}").replace(marker, "{prompt}")


def _serving_signature():
    """Text in, text out, with generation settings a request may override (`params`); without a
    params schema MLflow's server drops them."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema(
            [
                ParamSpec("max_new_tokens", "long", 256),
                ParamSpec("do_sample", "boolean", False),
                ParamSpec("temperature", "double", 1.0),
            ]
        ),
    )


def _requirements(adapter: bool = False) -> list[str]:
    from importlib.metadata import version

    # Inference would import torchvision to guess these, which has no CPU build here: name them.
    names = ("torch", "transformers", "accelerate", "safetensors", *(("peft",) if adapter else ()))
    return [f"{p}=={version(p).split('+')[0]}" for p in names]
