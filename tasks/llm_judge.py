"""An LLM judge on an OpenAI-compatible endpoint (vLLM, Ollama, a hosted API), through MLflow's judges.

Every model's answer to each task row gets a yes/no verdict and a rationale from a judge made by
`mlflow.genai.judges.make_judge` with the URI `openai:/<model>` and `base_url`: MLflow's native provider
path sends each request with `requests` (no `openai` or `litellm` package). The verdicts are the per-row
metric `llm_judge_pass` (1.0 yes, 0.0 no), so evaluation gives them a Wilson interval and paired
differences like any yes/no metric, and a gate can decide on them; the rationales go to
`llm_judge.jsonl` in the evaluate stage's directory, beside `samples.jsonl`.

The API key is read from the variable `api_key_env` names and lent to MLflow as OPENAI_API_KEY while
the judge runs (MLflow's openai provider reads it from there and from nowhere else): it never enters
the config, a cache key, a file or MLflow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunegate.config import LLMJudgeSection
from tunegate.environment import lent_environ
from tunegate.errors import ConfigError, TunegateError
from tunegate.out_of_memory import causes

log = logging.getLogger(__name__)

METRIC = "llm_judge_pass"
RATIONALES = "llm_judge.jsonl"  # in the evaluate stage's out_dir; logged as evaluation/llm_judge.jsonl

# The rubric comes from the config; this names what MLflow puts in the user message (its template
# variables, which make_judge requires in the instructions and fills with the values passed).
_FIELDS = (
    "The conversation so far is in {{ inputs }}, the assistant's answer to its last message in "
    "{{ outputs }}, and the facts a correct answer states (empty when none are known) in "
    "{{ expectations }}."
)


class LLMJudgeUnavailable(ConnectionError):
    """The judge's endpoint did not answer: refused, timed out, or 429/5xx. A ConnectionError and not a
    TunegateError, so that Prefect retries the stage (flows/retries.py): the server may be back."""


class LLMJudgeError(TunegateError):
    """The judge's endpoint answered, but not with a verdict (a model it does not serve, a request it
    rejects, a reply that is not yes or no). Never retried: the same request fails the same way."""


def check_endpoint(cfg: LLMJudgeSection) -> None:
    """Ask the endpoint for its models (GET <base_url>/models, with the key) before any verdict, so that
    a server that is down or a key it refuses fails in seconds, naming the endpoint and the fix.

    Raises:
        ConfigError: the key's variable is unset; the endpoint refuses the key (401/403); base_url is not
            the root of an OpenAI-compatible API (404, or no model list).
        LLMJudgeUnavailable: the endpoint does not answer, times out, or answers 429/5xx.
    """
    import requests

    url = f"{_root(cfg)}/models"
    try:
        resp = requests.get(url, headers=_auth(_api_key(cfg)), timeout=cfg.timeout_s)
    except requests.exceptions.SSLError as exc:  # a certificate that fails fails again
        raise ConfigError(
            [
                f"evaluate.llm_judge.base_url: TLS to {cfg.base_url} failed ({exc}); trust its certificate "
                "(REQUESTS_CA_BUNDLE) or correct the URL"
            ]
        ) from exc
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        raise LLMJudgeUnavailable(
            f"the LLM judge's endpoint {cfg.base_url} did not answer within {cfg.timeout_s:g} s: start the "
            "server there (vLLM: `vllm serve MODEL`; Ollama: `ollama serve`) or correct "
            f"evaluate.llm_judge.base_url ({type(exc).__name__}: {exc})"
        ) from exc
    except requests.exceptions.RequestException as exc:
        raise ConfigError([f"evaluate.llm_judge.base_url: cannot request {url}: {exc}"]) from exc
    _check_answer(cfg, url, resp)


def judge_answers(
    cfg: LLMJudgeSection, rows: list[dict], answers: dict[str, list[str]], *, out_dir: Path
) -> dict[str, list[float]]:
    """The judge's verdict on each model's answer to each task row (the first `cfg.max_rows`, the same
    for every model): label -> 1.0 (yes) or 0.0 (no) per row. Writes `out_dir/llm_judge.jsonl`, one line
    per verdict: the row's index among the eval rows, the model's label, the verdict, the rationale.

    Raises:
        ConfigError, LLMJudgeUnavailable: as `check_endpoint`, which runs first.
        LLMJudgeError: the endpoint answered a request with something other than a verdict.
    """
    from typing import Literal

    from mlflow.genai.judges import make_judge

    check_endpoint(cfg)
    task = [i for i, r in enumerate(rows) if r["set"] == "task"][: cfg.max_rows]
    judge = make_judge(
        name=METRIC,
        instructions=f"{cfg.guidelines}\n\n{_FIELDS}",
        model=f"openai:/{cfg.model}",
        feedback_value_type=Literal["yes", "no"],
        inference_params={"temperature": cfg.temperature},
        base_url=f"{_root(cfg)}/chat/completions",
    )
    values: dict[str, list[float]] = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    with _judge_env(cfg), open(out_dir / RATIONALES, "w", encoding="utf-8") as f:
        for label, texts in answers.items():
            values[label] = []
            for i in task:
                verdict, rationale = _verdict(judge, cfg, rows[i], texts[i], f"task row {i}, {label}")
                values[label].append(1.0 if verdict == "yes" else 0.0)
                line = {"row": i, "model": label, "verdict": verdict, "rationale": rationale}
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
            log.info("LLM judge %s: %s passes %d of %d", cfg.model, label, sum(values[label]), len(task))
    return values


def _verdict(judge, cfg: LLMJudgeSection, row: dict, answer: str, where: str) -> tuple[str, str]:
    facts = list(row.get("expected_any") or []) + ([row["exact"]] if row.get("exact") else [])
    try:
        feedback = judge(
            inputs={"conversation": row["prompt"]},
            outputs=answer,
            expectations={"expected_facts": facts},
        )
    except Exception as exc:  # noqa: BLE001 - re-raised with the endpoint, the row and the kind
        if _unavailable(exc):
            raise LLMJudgeUnavailable(
                f"the LLM judge's endpoint {cfg.base_url} stopped answering ({where}) after MLflow's "
                f"retries: {exc}"
            ) from exc
        raise LLMJudgeError(f"the LLM judge {cfg.model!r} at {cfg.base_url} failed ({where}): {exc}") from exc
    verdict = str(feedback.value).strip().lower()
    if feedback.error is not None or verdict not in ("yes", "no"):
        raise LLMJudgeError(
            f"the LLM judge {cfg.model!r} at {cfg.base_url} gave no yes/no verdict ({where}): value "
            f"{feedback.value!r}, error {feedback.error}. Use a model that follows JSON instructions, or "
            "an endpoint with structured output (vLLM, Ollama and OpenAI have it)"
        )
    return verdict, feedback.rationale or ""


def _check_answer(cfg: LLMJudgeSection, url: str, resp: Any) -> None:
    status = resp.status_code
    if status in (401, 403):
        why = (
            f"refused the key in ${cfg.api_key_env} (HTTP {status}): set {cfg.api_key_env} to a key it accepts"
            if cfg.api_key_env
            else f"wants a key (HTTP {status}): set evaluate.llm_judge.api_key_env to the name of the "
            "environment variable that holds it"
        )
        raise ConfigError([f"evaluate.llm_judge: {cfg.base_url} {why}"])
    if status == 429 or status >= 500:
        raise LLMJudgeUnavailable(
            f"the LLM judge's endpoint {cfg.base_url} answered HTTP {status} to {url}: busy or failing; "
            "the stage is retried"
        )
    try:
        listed = [m.get("id") for m in resp.json()["data"]] if status == 200 else None
    except (ValueError, KeyError, TypeError, AttributeError):
        listed = None
    if listed is None:
        raise ConfigError(
            [
                f"evaluate.llm_judge.base_url: {url} answered HTTP {status} without a model list: give the root "
                "of an OpenAI-compatible API, usually ending in /v1 (e.g. http://localhost:8000/v1)"
            ]
        )
    if cfg.model not in listed:  # Ollama also serves `name` as `name:latest`; a proxy may list aliases
        log.warning(
            "the LLM judge's endpoint %s does not list %r among its models %s",
            cfg.base_url,
            cfg.model,
            listed[:20],
        )


def _unavailable(exc: BaseException) -> bool:
    """Whether the failure is the endpoint out of reach, along the chain of causes: a connection error
    or a timeout, or the 429/5xx answers MLflow kept retrying (its ChatCompletionError has the status)."""
    import requests

    for link in causes(exc):
        if isinstance(link, requests.exceptions.SSLError):  # a certificate that fails fails again
            return False
        if isinstance(link, ConnectionError | TimeoutError | requests.ConnectionError | requests.Timeout):
            return True
        status = getattr(link, "status_code", None)
        if isinstance(status, int) and (status == 429 or 500 <= status <= 599):
            return True
    return False


@contextlib.contextmanager
def _judge_env(cfg: LLMJudgeSection) -> Iterator[None]:
    """What MLflow's judge reads from the environment, set while judging and then restored: the key
    from OPENAI_API_KEY (its openai provider's only source; without `api_key_env` a placeholder, so that
    an OPENAI_API_KEY of this environment never reaches another endpoint), each request's timeout, and
    no model catalog from GitHub (MLflow fetches one for cost estimates; the bundled copy serves, and
    nothing but the endpoint is contacted)."""
    lent = {
        "OPENAI_API_KEY": _api_key(cfg) or "no-key",
        "MLFLOW_GATEWAY_ROUTE_TIMEOUT_SECONDS": str(math.ceil(cfg.timeout_s)),
        "MLFLOW_MODEL_CATALOG_URI": "",
    }
    with lent_environ(lent):
        yield


def _api_key(cfg: LLMJudgeSection) -> str | None:
    if cfg.api_key_env is None:
        return None
    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise ConfigError(
            [
                f"evaluate.llm_judge.api_key_env: the variable {cfg.api_key_env} is not set: export it with the "
                f"endpoint's key, or fill it from a Prefect Secret block (run.secrets: "
                f"{{{cfg.api_key_env}: BLOCK_NAME}})"
            ]
        )
    return key


def _auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def _root(cfg: LLMJudgeSection) -> str:
    return cfg.base_url.rstrip("/")
