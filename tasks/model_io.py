"""Saving and loading models: atomic saves (merged weights, or an adapter with the identity of its
base), and loading a causal LM or an adapter merged onto its base."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from tasks.training import on_cuda
from tunegate.artifacts import BASE_REF, ModelArtifact, base_of


def save_policy(trainer, tokenizer, path: Path, save: str, base: ModelArtifact) -> None:
    """Merged full weights, or the adapter alone with the identity (path, digest, origin) of the model
    it was trained on beside it. Written to a temporary directory and renamed.

    Under FSDP or DeepSpeed the weights are sharded across processes: every process calls
    `trainer.save_model` (it gathers them, and only the main process writes), then the main process
    merges an adapter if asked and renames."""
    extra = {BASE_REF: base.model_dump(mode="json")} if save == "adapter" else None
    if not (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
        model = trainer.model
        if save == "merged" and hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        save_model_atomic(model, tokenizer, path, extra)
        return
    tmp = path.with_name(path.name + ".gathered")
    trainer.save_model(str(tmp))
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if save == "merged" and is_adapter(tmp):
        (tmp / BASE_REF).write_text(json.dumps(base.model_dump(mode="json")), encoding="utf-8")
        merged, _ = load_causal_lm(str(tmp), trust_remote_code=base.trust_remote_code)
        save_model_atomic(merged, tokenizer, path)
    else:
        save_model_atomic(_Saved(tmp), tokenizer, path, extra)
    shutil.rmtree(tmp, ignore_errors=True)


class _Saved:
    """A model already written to a directory, for `save_model_atomic`: saving copies the files."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def save_pretrained(self, target: Path, **_: Any) -> None:
        shutil.copytree(self.directory, target, dirs_exist_ok=True)


def save_model_atomic(model, tokenizer, path: Path, extra: dict[str, Any] | None = None) -> None:
    """Write to a temporary directory, then rename: a crash never leaves a half-written model.
    Under `accelerate launch`, only the main process writes."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    for name, content in (extra or {}).items():
        (tmp / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def is_adapter(path: str | Path) -> bool:
    """Whether `path` holds a PEFT adapter (applied to a base model on load) rather than full weights."""
    return (Path(path) / "adapter_config.json").exists()


def load_causal_lm(
    path: str, quantization=None, *, trust_remote_code: bool = False, chat_template: str | None = None
):
    """A causal LM and its tokenizer (pad token set): bf16 and SDPA attention on CUDA, fp32 on CPU.
    An adapter directory is loaded onto its base model and merged, so callers see one plain model.

    Code shipped with the model runs only with `trust_remote_code` (the record's, which comes from
    `model.trust_remote_code`); otherwise transformers' own architecture is used, or loading fails.
    `chat_template` (the record's, from `model.chat_template`) replaces the tokenizer's own."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.bfloat16 if on_cuda() else torch.float32
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "attn_implementation": "sdpa",
        "trust_remote_code": trust_remote_code,
    }
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if is_adapter(path):
        from peft import PeftModel

        # The model the adapter was trained on: our reference (itself possibly an adapter), else PEFT's.
        if (ref := base_of(path)) is not None:
            base, _ = load_causal_lm(ref.path, quantization, trust_remote_code=trust_remote_code)
        else:
            config = json.loads((Path(path) / "adapter_config.json").read_text())
            base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], **kwargs)
        return PeftModel.from_pretrained(base, path).merge_and_unload(), tokenizer
    return AutoModelForCausalLM.from_pretrained(path, **kwargs), tokenizer
