"""Stage 6: score the base model, the candidate and the current champion on the same frozen eval sets.

The eval data carries its own acceptance tests (see `data_checks/formats.py`): each row belongs to a set
(task, canary, safety) and defines checks scored by code (`tasks/scoring.py`). Metrics per model:
- eval_loss, perplexity:  loss on the held-out SFT split's answers (prompt tokens masked), and exp of it
- task_accuracy:          task rows whose every check passes; fact_accuracy / exact_match / regex_match /
                          json_valid: the task rows that define that check
- brand_format:           task answers that open and close with the brand's greeting and sign-off
- reward_score:           mean score of the task answers by the proxy reward model, the one online RL
                          optimised against (grpo, rloo): it shows what RL pushed up, not that it is good
- judge_score:            mean score of the task answers by the judge, a second reward model trained on
                          preference pairs the proxy never saw and never an RL reward (`pref_judge`)
- llm_judge_pass:         task answers an LLM judge on an OpenAI-compatible endpoint passes
                          (`evaluate.llm_judge`, `tasks/llm_judge.py`); its rationales in llm_judge.jsonl
- canary_accuracy:        general questions (catastrophic forgetting), scored like task rows
- bench.<task>.<metric>:  standard benchmarks (`evaluate.benchmarks`, forgetting too), lm-evaluation-harness
                          tasks scored per row (`tasks/benchmarks.py`)
- safety_refusal_rate:    requests the assistant must decline that it declines
- win_rate_vs_base, win_rate_vs_champion (candidate): task prompts where the judge prefers its answer
                          (ties count half); only with a judge, never by the proxy the policy was
                          optimised against (dpo, none, build.judge_fraction=0: not computed)
- ms_per_token, size_mb:  greedy generation latency per token; the model's size on disk

Every per-row metric gets a confidence interval by the method its values call for (Wilson for yes/no
metrics, BCa bootstrap for continuous ones; `tasks/intervals.py`), and for each baseline the paired
interval of the candidate's difference from it (Newcombe's method 10 for yes/no metrics, a paired BCa
bootstrap otherwise), each recorded with its method, so a gate can decide on the pessimistic end.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from tasks import llm_judge
from tasks.benchmarks import check_benchmarks, merge_runs, score_benchmarks
from tasks.intervals import metric_interval, paired_interval
from tasks.model_io import load_causal_lm
from tasks.reward import load_reward_model, score_conversations
from tasks.scoring import REFUSAL_MARKERS, brand_ok, row_checks, wins
from tasks.training import on_cuda
from tunegate.artifacts import EvalReport, InstructionDataset, ModelArtifact
from tunegate.config import EvaluateSection
from tunegate.errors import ConfigError, StageGateFailed

log = logging.getLogger(__name__)

# check -> the metric that counts it, among the task rows that define it
CHECK_METRICS = {
    "expected_any": "fact_accuracy",
    "exact": "exact_match",
    "regex": "regex_match",
    "json_schema": "json_valid",
}
SETS = ("task", "canary", "safety")


def evaluate_models(
    cfg: EvaluateSection,
    data: InstructionDataset,
    models: dict[str, ModelArtifact],
    reward: ModelArtifact | None,
    judge: ModelArtifact | None = None,
    *,
    out_dir: Path,
    seed: int,
    champion_version: str | None = None,
) -> EvalReport:
    """Score each model (label -> model) on the eval rows and the SFT eval split; with `reward` (the
    proxy) its reward_score, with `judge` its judge_score and the candidate's win rates.

    Raises:
        StageGateFailed: fewer task rows than `cfg.min_eval_rows`, or a canary or safety set smaller than
            `cfg.min_set_rows` (too few to decide on).
        ConfigError, LLMJudgeUnavailable, LLMJudgeError: with `cfg.llm_judge`, its endpoint refuses the
            key, is down, or gives no verdict (`tasks/llm_judge.py`).
        ConfigError: a benchmark of `cfg.benchmarks` that is not found or has no per-row metric
            (`tasks/benchmarks.py`).
    """
    from datasets import Dataset
    from transformers import set_seed

    set_seed(seed)
    rows = [_with_defaults(r) for r in Dataset.from_parquet(data.splits["eval"].path)]
    sets = {name: sum(r["set"] == name for r in rows) for name in SETS}
    _require_sizes(cfg, sets)
    if cfg.llm_judge is not None:  # a server that is down or a refused key fails now, not after generating
        llm_judge.check_endpoint(cfg.llm_judge)
    if problems := check_benchmarks(cfg.benchmarks):  # a benchmark not found fails now, not after generating
        raise ConfigError(problems)
    loss_rows = list(Dataset.from_parquet(data.splits["sft_eval"].path))
    out_dir.mkdir(parents=True, exist_ok=True)
    markers = tuple(cfg.refusal_markers) if cfg.refusal_markers else REFUSAL_MARKERS
    per_row: dict[str, dict[str, list[float]]] = {}  # label -> metric -> value per row
    weights: dict[str, dict[str, list[float]]] = {}  # label -> metric -> row weights (tokens, for the loss)
    scalars: dict[str, dict[str, float]] = {}
    answers: dict[str, list[str]] = {}
    checks: dict[str, list[dict[str, bool]]] = {}
    bench_runs: dict[str, dict] = {}  # label -> benchmark task -> what it was scored with
    for label, artifact in models.items():
        path = artifact.path
        model, tokenizer = _load(path, artifact.trust_remote_code)
        start = time.perf_counter()
        texts, n_tokens = generate_answers(model, tokenizer, [r["prompt"] for r in rows], cfg)
        elapsed = time.perf_counter() - start
        answers[label] = texts
        checks[label] = [
            row_checks(r, t, cfg.brand_prefix, cfg.brand_suffix, markers)
            for r, t in zip(rows, texts, strict=True)
        ]
        per_row[label] = _row_metrics(cfg, rows, texts, checks[label])
        weights[label] = {}
        if loss_rows:
            sums, counts = completion_losses(model, tokenizer, loss_rows)
            per_row[label]["eval_loss"] = [s / max(c, 1) for s, c in zip(sums, counts, strict=True)]
            weights[label]["eval_loss"] = [float(c) for c in counts]
        if cfg.benchmarks:  # standard benchmarks (forgetting), on the model already loaded
            bench, bench_runs[label] = score_benchmarks(
                model, tokenizer, cfg.benchmarks, batch_size=cfg.batch_size, seed=seed
            )
            per_row[label].update(bench)
        scalars[label] = {"ms_per_token": 1000 * elapsed / max(n_tokens, 1), "size_mb": dir_size_mb(path)}
        del model
    for metric, scorer in (("reward_score", reward), ("judge_score", judge)):
        if scorer is not None:
            _score_answers(per_row, metric, scorer, rows, answers)
    llm_judge_path = None
    if cfg.llm_judge is not None:
        for label, verdicts in llm_judge.judge_answers(cfg.llm_judge, rows, answers, out_dir=out_dir).items():
            per_row[label][llm_judge.METRIC] = verdicts
        llm_judge_path = str(out_dir / llm_judge.RATIONALES)
    if judge is not None:  # by the judge alone: the policy was optimised against the proxy
        for other in ("base", "champion"):
            if "candidate" in per_row and other in per_row:
                per_row["candidate"][f"win_rate_vs_{other}"] = wins(
                    per_row["candidate"]["judge_score"], per_row[other]["judge_score"]
                )
    samples = out_dir / "samples.jsonl"
    _write_samples(samples, rows, answers, checks)
    per_row_path = out_dir / "per_row.json"
    per_row_path.write_text(json.dumps({"values": per_row, "weights": weights}), encoding="utf-8")
    report = summarise_report(
        cfg,
        per_row,
        weights,
        scalars,
        seed,
        n_prompts=len(rows),
        sets=sets,
        samples_path=str(samples),
        per_row_path=str(per_row_path),
        llm_judge_path=llm_judge_path,
        champion_version=champion_version,
        benchmarks=merge_runs(bench_runs),
    )
    log.info("evaluation: %s", report.scores)
    return report


def summarise_report(cfg: EvaluateSection, per_row, weights, scalars, seed: int, **record) -> EvalReport:
    """The report from per-row values (label -> metric -> values, and row weights): point values,
    intervals by method, the candidate's paired differences and what each stage added. `record`: the
    report's other fields (n_prompts, sets, samples_path, ...)."""
    scores, intervals, deltas, methods, delta_methods = _summarise(cfg, per_row, weights, scalars, seed)
    how = {"confidence": cfg.confidence, "resamples": cfg.bootstrap_resamples, "seed": seed}
    gains, gain_methods = stage_gains(per_row, weights, scores, how)
    return EvalReport(
        scores=scores,
        intervals=intervals,
        deltas=deltas,
        methods=methods,
        delta_methods=delta_methods,
        gains=gains,
        gain_methods=gain_methods,
        counts={label: {m: len(v) for m, v in metrics.items()} for label, metrics in per_row.items()},
        confidence=cfg.confidence,
        **record,
    )


def _score_answers(per_row, metric: str, scorer: ModelArtifact, rows: list[dict], answers) -> None:
    """`metric` for each model: the reward model `scorer`'s score of its answer to each task row."""
    model, tokenizer = load_reward_model(scorer.path, trust_remote_code=scorer.trust_remote_code)
    if on_cuda():
        model = model.to("cuda")
    task = [i for i, r in enumerate(rows) if r["set"] == "task"]
    for label, texts in answers.items():
        convs = [rows[i]["prompt"] + [{"role": "assistant", "content": texts[i]}] for i in task]
        per_row[label][metric] = score_conversations(model, tokenizer, convs)


def _with_defaults(row: dict) -> dict:
    """Rows built before eval sets existed carry only `expected_any`: they are task rows."""
    defaults = {"set": "task", "expected_any": None, "exact": None, "regex": None, "json_schema": None}
    return {**defaults, **{k: v for k, v in row.items() if v is not None}, "refuse": bool(row.get("refuse"))}


def _require_sizes(cfg: EvaluateSection, sets: dict[str, int]) -> None:
    problems = []
    if sets["task"] < cfg.min_eval_rows:
        problems.append(f"{sets['task']} task rows, fewer than evaluate.min_eval_rows={cfg.min_eval_rows}")
    for name in ("canary", "safety"):
        if 0 < sets[name] < cfg.min_set_rows:
            problems.append(f"{sets[name]} {name} rows, fewer than evaluate.min_set_rows={cfg.min_set_rows}")
    if problems:
        raise StageGateFailed(
            "too few eval rows to decide on: "
            + "; ".join(problems)
            + ". Add eval rows (a set with no rows at all is simply not scored)."
        )


def _row_metrics(
    cfg: EvaluateSection, rows: list[dict], texts: list[str], checks: list[dict[str, bool]]
) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}

    def add(metric: str, value: bool) -> None:
        out.setdefault(metric, []).append(float(value))

    for row, text, passed in zip(rows, texts, checks, strict=True):
        if row["set"] == "task":
            add("task_accuracy", all(passed.values()))
            for check, metric in CHECK_METRICS.items():
                if check in passed:
                    add(metric, passed[check])
            if cfg.brand_prefix or cfg.brand_suffix:
                add("brand_format", brand_ok(text, cfg.brand_prefix, cfg.brand_suffix))
        elif row["set"] == "canary":
            add("canary_accuracy", all(passed.values()))
        else:
            add("safety_refusal_rate", all(passed.values()))
    return out


def _summarise(cfg: EvaluateSection, per_row, weights, scalars, seed: int):
    """Point values, each per-row metric's interval, and the candidate's paired interval against each
    baseline on the metrics both have; with the method of every interval (label or baseline -> metric
    -> method)."""
    scores: dict[str, dict[str, float]] = {}
    intervals: dict[str, dict[str, list[float]]] = {}
    methods: dict[str, dict[str, str]] = {}
    how = {"confidence": cfg.confidence, "resamples": cfg.bootstrap_resamples, "seed": seed}
    for label, metrics in per_row.items():
        scores[label], intervals[label], methods[label] = dict(scalars[label]), {}, {}
        for metric, values in metrics.items():
            w = weights[label].get(metric)
            scores[label][metric] = _weighted_mean(values, w)
            low, high, methods[label][metric] = metric_interval(values, w, **how)
            intervals[label][metric] = [low, high]
        if "eval_loss" in scores[label]:  # perplexity is monotone in the loss: its interval maps through
            scores[label]["perplexity"] = math.exp(scores[label]["eval_loss"])
            intervals[label]["perplexity"] = [math.exp(x) for x in intervals[label]["eval_loss"]]
            methods[label]["perplexity"] = f"{methods[label]['eval_loss']} (exp of eval_loss)"
    deltas: dict[str, dict[str, list[float]]] = {}
    delta_methods: dict[str, dict[str, str]] = {}
    for other in ("base", "sft", "champion"):
        if "candidate" in per_row and other in per_row:
            deltas[other], delta_methods[other] = _paired(per_row, weights, "candidate", other, how)
    return scores, intervals, deltas, methods, delta_methods


def stage_gains(per_row, weights, scores, how) -> tuple[dict, dict]:
    """What each stage added, paired on the same rows: SFT over the base model, alignment over SFT.
    Stage -> metric -> [difference, low, high], and stage -> metric -> interval method."""
    gains: dict[str, dict[str, list[float]]] = {}
    methods: dict[str, dict[str, str]] = {}
    for stage, after, before in (("sft", "sft", "base"), ("alignment", "candidate", "sft")):
        if after in per_row and before in per_row:
            bounds, methods[stage] = _paired(per_row, weights, after, before, how)
            gains[stage] = {m: [scores[after][m] - scores[before][m], *lo_hi] for m, lo_hi in bounds.items()}
    return gains, methods


def _paired(per_row, weights, label: str, other: str, how) -> tuple[dict, dict]:
    """`label` minus `other` on the metrics both have: metric -> [low, high], metric -> method."""
    bounds: dict[str, list[float]] = {}
    methods: dict[str, str] = {}
    for metric in sorted(per_row[label].keys() & per_row[other].keys()):
        low, high, methods[metric] = paired_interval(
            per_row[label][metric],
            per_row[other][metric],
            weights[label].get(metric),
            weights[other].get(metric),
            **how,
        )
        bounds[metric] = [low, high]
    return bounds, methods


def _weighted_mean(values: list[float], w: list[float] | None) -> float:
    if not values:
        return float("nan")
    if w is None:
        return sum(values) / len(values)
    return sum(v * x for v, x in zip(values, w, strict=True)) / max(sum(w), 1e-12)


def _write_samples(path: Path, rows, answers, checks) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i, r in enumerate(rows):
            row = {"set": r["set"], "question": r["prompt"][-1]["content"]}
            row.update(
                {k: r[k] for k in ("expected_any", "exact", "regex", "json_schema", "refuse") if r.get(k)}
            )
            for label in answers:
                row[label] = answers[label][i]
                row[f"{label}.checks"] = checks[label][i]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def dir_size_mb(path: str | Path) -> float:
    """What the model takes on disk: every file under its directory (an adapter: its own files only)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


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
    if not rows:
        return float("nan")
    sums, counts = completion_losses(model, tokenizer, rows, batch_size)
    return sum(sums) / max(sum(counts), 1)


def completion_losses(
    model, tokenizer, rows: list[dict], batch_size: int = 16
) -> tuple[list[float], list[int]]:
    """Per row: the summed token loss on its completion (prompt tokens masked) and its token count."""
    import torch

    device = next(model.parameters()).device
    encoded = []
    for row in rows:
        p = _ids(tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True))
        full = _ids(tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True))
        encoded.append((full, [-100] * len(p) + full[len(p) :]))
    # Batches of similar length: a forward pass pays for every padding position it carries.
    order = sorted(range(len(rows)), key=lambda i: len(encoded[i][0]))
    sums: list[float] = [0.0] * len(rows)
    counts: list[int] = [0] * len(rows)
    for i in range(0, len(rows), batch_size):
        batch = order[i : i + batch_size]
        ids = [encoded[j][0] for j in batch]
        labels = [encoded[j][1] for j in batch]
        width = max(map(len, ids))
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=device)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)
        lab = torch.tensor([x + [-100] * (width - len(x)) for x in labels], device=device)
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
        target = lab[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), target, ignore_index=-100, reduction="none"
        )  # (batch, positions); 0 where ignored
        for j, total, count in zip(batch, loss.sum(dim=1), (target != -100).sum(dim=1), strict=True):
            sums[j], counts[j] = float(total), int(count)
    return sums, counts


def _ids(enc) -> list[int]:
    return list(enc["input_ids"]) if hasattr(enc, "keys") else list(enc)


def _load(path: str, trust_remote_code: bool):
    model, tokenizer = load_causal_lm(path, trust_remote_code=trust_remote_code)
    if on_cuda():
        model = model.to("cuda")
    model.eval()
    return model, tokenizer
