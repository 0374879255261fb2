"""The generated model card: README.md with Hugging Face front matter, logged with every model.

Most useful first (the registry's description keeps a cut from the top): status, what it was
fine-tuned from, intended use and limitations, how to load and serve it, the gate verdict, the
training stages with their metrics and data, and the run's lineage tags.
"""

from __future__ import annotations

import json
from urllib.parse import urlparse

from tunegate.artifacts import GateVerdict, ModelArtifact
from tunegate.config import RegistrySection


def model_card(
    cfg: RegistrySection,
    candidate: ModelArtifact,
    verdict: GateVerdict,
    tags: dict[str, str],
    *,
    adapter_base: ModelArtifact | None = None,
    stages: list[ModelArtifact] | None = None,
    data: dict[str, int] | None = None,
) -> str:
    """The model card, as README.md with Hugging Face front matter: its status, what it was
    fine-tuned from, intended use and limitations, how to load and serve it, the gate verdict, the
    training stages with their metrics and data, and the run's lineage tags (most useful first: the
    registry's description keeps a cut from the top).

    Args:
        adapter_base: with `format: adapter`, the full-weights model the adapter applies to.
        stages: the models that led to the candidate, first stage first (default: the candidate).
        data: rows per dataset split (sft_train, pref_train, prompts, eval, ...), when known.
    """
    stages = stages or [candidate]
    failed = [r.gate for r in verdict.results if not r.passed]
    origin, origin_digest = _origin(candidate, stages, tags)
    front = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["tunegate", candidate.role, cfg.format, "gates-failed" if failed else "gates-passed"],
    }
    lines = ["---", *(f"{k}: {json.dumps(v)}" for k, v in front.items()), "---", f"# {cfg.model_name}", ""]
    if failed:
        lines.append(
            f"**Status: FAILED** (gates failed: {', '.join(f'`{g}`' for g in failed)}). This candidate "
            "is logged for audit only: it is not registered, and must not be served."
        )
    else:
        lines.append(
            f"**Status: passed every gate.** Registered as `{cfg.model_name}`; a version serves once it "
            f"holds the `{cfg.alias}` alias, which it takes only after a smoke test through MLflow."
        )
    if adapter_base is None:
        weights = "full weights (any adapters merged in)"
    else:
        weights = (
            f"the adapter alone; at load time it is applied to the `{adapter_base.role}` model at "
            f"`{adapter_base.path}` (digest `{adapter_base.digest[:16]}`, from `{adapter_base.base_model}`), "
            "which must stay in place (or pass `base_model_path=` to `load_model`)"
        )
    lines += [
        "",
        "## Fine-tuned from",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{origin}` |",
        f"| base digest | `{origin_digest}` |",
        f"| this model | `{candidate.role}`, digest `{candidate.digest[:16]}` |",
        f"| weights | {weights} |",
        "",
        *_use_and_limits(candidate, origin, data),
        "",
        *_how_to(cfg, failed),
        "",
        verdict.markdown,
        "",
        "## Training",
        "",
        "| stage | steps | digest | metrics |",
        "|---|---:|---|---|",
    ]
    for m in stages:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(m.metrics.items())) or "-"
        lines.append(f"| {m.role} | {m.steps} | `{m.digest[:16]}` | {shown} |")
    if data:
        lines += ["", "Data (rows per split):", "", "| split | rows |", "|---|---:|"]
        lines += [f"| {split} | {rows} |" for split, rows in sorted(data.items())]
    lines += ["", "## Lineage", "", "| tag | value |", "|---|---|"]
    lines += [f"| `{k}` | {_cell(v)} |" for k, v in sorted(tags.items())] or ["| - | - |"]
    return "\n".join(lines) + "\n"


def _origin(candidate: ModelArtifact, stages: list[ModelArtifact], tags: dict[str, str]) -> tuple[str, str]:
    """The model fine-tuning started from, and its digest: from the run's tags, else the first stage."""
    first = stages[0]
    origin = tags.get("tunegate.base_model") or candidate.base_model
    digest = tags.get("tunegate.base_model_digest") or (first.digest if first.role == "base" else "")
    return origin, digest or "not recorded"


def _use_and_limits(candidate: ModelArtifact, origin: str, data: dict[str, int] | None) -> list[str]:
    data = data or {}
    online = any(k.startswith("reward_") and not k.startswith("reward_margin") for k in candidate.metrics)
    dpo = any(k.startswith("reward_margin") for k in candidate.metrics)
    taught = [f"supervised on {data['sft_train']} conversations"] if "sft_train" in data else []
    pairs = data.get("pref_train")
    if online:
        taught.append(
            f"aligned by online RL on {data.get('prompts', 'its')} prompts, scored by a reward model"
            + (f" trained on {pairs} preference pairs" if pairs else "")
        )
    elif dpo:
        taught.append("aligned by DPO on " + (f"{pairs} preference pairs" if pairs else "preference pairs"))
    evaluated = f"the {data['eval']} held-out prompts" if "eval" in data else "the held-out prompts"
    lines = [
        "## Intended use",
        "",
        "An assistant for questions like those in its training data, answering in the format that data "
        "teaches" + (f" ({'; '.join(taught)})" if taught else "") + ". Send it user messages: the "
        "serving endpoint applies the chat template and returns the answer alone.",
        "",
        "## Limitations",
        "",
        f"- Measured only on {evaluated} behind the gate table above. Outside that domain its answers "
        "are unchecked: it may be wrong, or invent facts, with confidence.",
        "- Beyond what the gate table measures, not evaluated for safety, bias, toxicity or "
        "adversarial prompts: check those before it faces users.",
    ]
    if online:
        lines.append(
            "- Optimised against a learned reward model, which rewards what its preference pairs "
            "reward; the reward-hacking guard bounds answer growth and held-out loss, and (with a judge) "
            "checks that reward against a second reward model trained on other pairs, not every way "
            "a reward can be gamed."
        )
    lines.append(f"- It inherits the limitations and licence of its base model, `{origin}`.")
    return lines


def _how_to(cfg: RegistrySection, failed: list[str]) -> list[str]:
    uri = _display_uri(cfg.tracking_uri)
    if failed:
        return [
            "## Inspecting it",
            "",
            "Not registered. Its run's `tunegate.audit_model_uri` tag names the logged model:",
            "",
            "```python",
            "import mlflow",
            "",
            f'mlflow.set_tracking_uri("{uri}")',
            'parts = mlflow.transformers.load_model(AUDIT_MODEL_URI, return_type="components")',
            "```",
        ]
    target = f"models:/{cfg.model_name}@{cfg.alias}"
    return [
        "## Load",
        "",
        "```python",
        "import mlflow",
        "",
        f'mlflow.set_tracking_uri("{uri}")',
        f'parts = mlflow.transformers.load_model("{target}", return_type="components")',
        'model, tokenizer = parts["model"], parts["tokenizer"]',
        "```",
        "",
        "## Serve",
        "",
        "```bash",
        f"MLFLOW_TRACKING_URI={uri} mlflow models serve -m {target} --env-manager local --port 5000",
        "curl -s localhost:5000/invocations -H 'Content-Type: application/json' \\",
        """  -d '{"inputs": ["Hello!"], "params": {"max_new_tokens": 128}}'""",
        "```",
        "",
        "Each input is one user message; `params` may set `max_new_tokens`, `do_sample` and `temperature`.",
    ]


def _display_uri(uri: str) -> str:
    """The tracking URI without any user name or password in it."""
    parsed = urlparse(uri)
    if parsed.username or parsed.password:
        host = parsed.hostname or ""
        return parsed._replace(netloc=f"{host}:{parsed.port}" if parsed.port else host).geturl()
    return uri


def _cell(value: str) -> str:
    if not value:
        return "-"
    if value.startswith(("http://", "https://")):
        return f"<{value}>"
    return f"`{value}`"


DESCRIPTION_LIMIT = 5000  # characters: the registry's description column (VARCHAR(5000) on SQL stores)


def description(card: str) -> str:
    """The card without its front matter, fitted to the registry's description field: whole sections
    dropped from the end (lineage and training first; the version's tags hold the lineage too)."""
    body = card.split("---\n", 2)[2] if card.startswith("---\n") else card
    sections, dropped = body.split("\n## "), []
    while len(body) > DESCRIPTION_LIMIT and len(sections) > 1:
        dropped.insert(0, sections.pop().split("\n", 1)[0])
        note = f"\n\n(Left out to fit: {', '.join(dropped)}. The full card is README.md in the model's artifacts.)\n"
        body = "\n## ".join(sections).rstrip("\n") + note
    if len(body) > DESCRIPTION_LIMIT:  # the first section alone is too long
        note = "\n\n(Cut to fit. The full card is README.md in the model's artifacts.)\n"
        body = body[: body.rfind("\n", 0, DESCRIPTION_LIMIT - len(note))] + note
    return body
