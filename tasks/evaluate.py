"""Stage 6: score the base model, the candidate and the current champion on the same frozen eval sets.

Metrics per model:
- eval_loss:      mean loss on the held-out SFT split's answers (prompt tokens masked)
- fact_accuracy:  share of eval prompts whose greedy answer contains an accepted answer
- brand_format:   share of answers that open and close with the brand's greeting and sign-off
- reward_score:   mean reward-model score of the answers
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

from tasks.reward import load_reward_model, score_conversations
from tasks.training import load_causal_lm, on_cuda
from tunegate.artifacts import EvalReport, InstructionDataset, ModelArtifact
from tunegate.config import EvaluateSection
from tunegate.errors import StageGateFailed

log = logging.getLogger(__name__)


def evaluate_models(
    cfg: EvaluateSection,
    data: InstructionDataset,
    models: dict[str, str],
    reward: ModelArtifact | None,
    *,
    out_dir: Path,
    seed: int,
    champion_version: str | None = None,
) -> EvalReport:
    """Score each model (label -> model directory) on the eval prompts and the SFT eval split.

    Raises:
        StageGateFailed: fewer eval prompts than `cfg.min_eval_rows` (too few to decide on).
    """
    from datasets import Dataset
    from transformers import set_seed

    set_seed(seed)
    prompts = list(Dataset.from_parquet(data.splits["eval"].path))
    if len(prompts) < cfg.min_eval_rows:
        raise StageGateFailed(
            f"only {len(prompts)} eval prompts; evaluate.min_eval_rows={cfg.min_eval_rows} guards against "
            "deciding on a handful of samples. Add eval rows."
        )
    loss_rows = list(Dataset.from_parquet(data.splits["sft_eval"].path))
    out_dir.mkdir(parents=True, exist_ok=True)
    scores: dict[str, dict[str, float]] = {}
    answers: dict[str, list[str]] = {}
    for label, path in models.items():
        model, tokenizer = _load(path)
        start = time.perf_counter()
        texts, n_tokens = generate_answers(model, tokenizer, [p["prompt"] for p in prompts], cfg)
        elapsed = time.perf_counter() - start
        answers[label] = texts
        scores[label] = {
            "eval_loss": completion_loss(model, tokenizer, loss_rows),
            "fact_accuracy": _mean(
                fact_hit(t, p["expected_any"]) for t, p in zip(texts, prompts, strict=True)
            ),
            "ms_per_token": 1000 * elapsed / max(n_tokens, 1),
        }
        if cfg.brand_prefix or cfg.brand_suffix:
            scores[label]["brand_format"] = _mean(
                brand_ok(t, cfg.brand_prefix, cfg.brand_suffix) for t in texts
            )
        del model
    if reward is not None:
        reward_model, reward_tokenizer = load_reward_model(reward.path)
        for label, texts in answers.items():
            convs = [
                p["prompt"] + [{"role": "assistant", "content": t}]
                for p, t in zip(prompts, texts, strict=True)
            ]
            scores[label]["reward_score"] = _mean(score_conversations(reward_model, reward_tokenizer, convs))
    samples = out_dir / "samples.jsonl"
    with open(samples, "w", encoding="utf-8") as f:
        for i, p in enumerate(prompts):
            row = {"question": p["prompt"][-1]["content"], "expected_any": list(p["expected_any"])}
            row.update({label: answers[label][i] for label in answers})
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    log.info("evaluation: %s", scores)
    return EvalReport(
        scores=scores, n_prompts=len(prompts), samples_path=str(samples), champion_version=champion_version
    )


def fact_hit(text: str, expected_any: list[str]) -> bool:
    """An accepted answer appears as a whole token run: `$9` matches "$9." but not "$99" or "$19"."""
    return any(
        re.search(r"(?<![\w$])" + re.escape(e.strip()) + r"(?![\d])", text, re.IGNORECASE)
        for e in expected_any
    )


def brand_ok(text: str, prefix: str | None, suffix: str | None) -> bool:
    text = text.strip()
    return (not prefix or text.startswith(prefix)) and (not suffix or text.endswith(suffix))


def generate_answers(
    model, tokenizer, prompts: list[list[dict]], cfg: EvaluateSection
) -> tuple[list[str], int]:
    """Greedy answers, batched with left padding. Returns the texts and the tokens generated."""
    import torch

    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    device = next(model.parameters()).device
    texts, total = [], 0
    for i in range(0, len(prompts), cfg.batch_size):
        enc = tokenizer.apply_chat_template(
            prompts[i : i + cfg.batch_size],
            add_generation_prompt=True,
            return_tensors="pt",
            padding=True,
            return_dict=True,
        ).to(device)
        with torch.no_grad():
            out = model.generate(
                **enc, max_new_tokens=cfg.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        new = out[:, enc["input_ids"].shape[1] :]
        total += int((new != tokenizer.pad_token_id).sum())
        texts += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    tokenizer.padding_side = side
    return texts, total


def completion_loss(model, tokenizer, rows: list[dict], batch_size: int = 16) -> float:
    """Mean token loss on the completions, prompt tokens masked, exactly what SFT optimises."""
    import torch

    if not rows:
        return float("nan")
    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    for i in range(0, len(rows), batch_size):
        ids, labels = [], []
        for row in rows[i : i + batch_size]:
            p = _ids(tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True))
            full = _ids(tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True))
            ids.append(full)
            labels.append([-100] * len(p) + full[len(p) :])
        width = max(map(len, ids))
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=device)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)
        lab = torch.tensor([x + [-100] * (width - len(x)) for x in labels], device=device)
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
        target = lab[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total_loss += float(loss)
        total_tokens += int((target != -100).sum())
    return total_loss / max(total_tokens, 1)


def _ids(enc) -> list[int]:
    return list(enc["input_ids"]) if hasattr(enc, "keys") else list(enc)


def _load(path: str):
    model, tokenizer = load_causal_lm(path)
    if on_cuda():
        model = model.to("cuda")
    model.eval()
    return model, tokenizer


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else float("nan")
