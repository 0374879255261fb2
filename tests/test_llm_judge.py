"""The LLM judge (`evaluate.llm_judge`, tasks/llm_judge.py), driven through MLflow's judge against a
local stand-in for an OpenAI-compatible LLM endpoint that each test starts on 127.0.0.1: no model
behind it, a fixed rule instead (yes when the answer states one of the row's reference facts)."""

from __future__ import annotations

import json
import os
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from flows.retries import is_transient
from flows.stages import BY_NAME, stage_key
from tasks.evaluate import evaluate_models, summarise_report
from tasks.gates import apply_gates
from tasks.llm_judge import (
    RATIONALES,
    LLMJudgeError,
    LLMJudgeUnavailable,
    check_endpoint,
    judge_answers,
)
from tunegate.config import EvaluateSection, GateSpec, LLMJudgeSection, load_config, parse_config
from tunegate.errors import ConfigError

KEY_ENV = "TUNEGATE_TEST_JUDGE_KEY"
KEY = "sk-test-judge-key-must-not-leak-8231"
MODEL = "stand-in-judge"


def rule(answer: str, facts: list[str]) -> str:
    """The stand-in's verdict: yes when the answer states one of the reference facts."""
    return "yes" if any(f.lower() in answer.lower() for f in facts) else "no"


class StandInEndpoint:
    """A local stand-in for an OpenAI-compatible LLM endpoint: GET /v1/models and POST
    /v1/chat/completions in the shapes MLflow's openai provider sends and parses, with the rule above
    in place of a model. Requests with another key than `key` (when set) get OpenAI's 401."""

    def __init__(self, key: str | None = KEY, reply: dict | None = None) -> None:
        self.key, self.reply, self.requests = key, reply, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests.append(("GET", self.path, self._headers(), None))
                if not self._authorised():
                    return
                if self.path != "/v1/models":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                self._send(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(("POST", self.path, self._headers(), body))
                if not self._authorised():
                    return
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                verdict = outer.reply or outer.judge(body["messages"][-1]["content"])
                message = {"role": "assistant", "content": json.dumps(verdict)}
                self._send(
                    200,
                    {
                        "id": f"chatcmpl-{len(outer.requests)}",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
                    },
                )

            def _headers(self) -> dict[str, str]:
                return {k.lower(): v for k, v in self.headers.items()}

            def _authorised(self) -> bool:
                if outer.key is None or self.headers.get("Authorization") == f"Bearer {outer.key}":
                    return True
                error = {"message": "Incorrect API key provided", "code": "invalid_api_key"}
                self._send(401, {"error": error})
                return False

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    @staticmethod
    def judge(content: str) -> dict:
        """MLflow's user message is `inputs: <json>`, `outputs: <json>`, `expectations: <json>`, each
        at the start of a line (JSON strings escape their newlines)."""
        parts = re.split(r"^(inputs|outputs|expectations): ", content, flags=re.M)
        fields = {name: json.loads(value) for name, value in zip(parts[1::2], parts[2::2], strict=True)}
        facts, answer = fields["expectations"]["expected_facts"], fields["outputs"]
        verdict = rule(answer, facts)
        return {"result": verdict, "rationale": f"{verdict}: the answer {answer!r} against the facts {facts}"}

    def chats(self) -> list[dict]:
        return [body for method, _, _, body in self.requests if method == "POST"]

    def __enter__(self) -> StandInEndpoint:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def endpoint():
    with StandInEndpoint() as e:
        yield e


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    return KEY


def _cfg(base_url: str, **kw) -> LLMJudgeSection:
    return LLMJudgeSection(base_url=base_url, model=MODEL, api_key_env=KEY_ENV, **kw)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _row(question: str, set_: str = "task", **checks) -> dict:
    return {"set": set_, "prompt": [{"role": "user", "content": question}], **checks}


ROWS = [
    _row("What's the fee for the Pup plan?", expected_any=["$9"]),
    _row("What is the capital of France?", "canary", expected_any=["Paris"]),
    _row("How many pets does the Family plan cover?", expected_any=["4 pets", "four pets"]),
    _row("Pup plan price, digits only?", exact="9"),
]
GOOD = ["It costs $9 per month.", "Paris.", "Up to four pets.", "9"]
POOR = ["It costs $19 per month.", "Paris.", "Up to 4 pets.", "nine"]


def test_the_verdicts_follow_the_endpoints_rule_and_the_rationales_are_written(
    endpoint, key, tmp_path, monkeypatch
):
    import mlflow.utils.providers

    fetched = []  # MLflow's model catalog from GitHub: nothing but the endpoint may be contacted
    monkeypatch.setattr(mlflow.utils.providers, "_fetch_http_provider", lambda *a: fetched.append(a))
    values = judge_answers(_cfg(endpoint.base_url), ROWS, {"base": POOR, "candidate": GOOD}, out_dir=tmp_path)
    # Task rows 0, 2, 3 (not the canary row): "$19" is not "$9", "nine" is not "9".
    assert values == {"base": [0.0, 1.0, 0.0], "candidate": [1.0, 1.0, 1.0]}
    lines = [json.loads(x) for x in (tmp_path / RATIONALES).read_text().splitlines()]
    assert [(x["row"], x["model"], x["verdict"]) for x in lines] == [
        (0, "base", "no"),
        (2, "base", "yes"),
        (3, "base", "no"),
        (0, "candidate", "yes"),
        (2, "candidate", "yes"),
        (3, "candidate", "yes"),
    ]
    assert lines[0]["rationale"] == "no: the answer 'It costs $19 per month.' against the facts ['$9']"
    # What reached the endpoint: the configured model and temperature, the key, each row's own facts.
    chats = endpoint.chats()
    assert len(chats) == 6 and {c["model"] for c in chats} == {MODEL}
    assert {c["temperature"] for c in chats} == {0.0}
    assert all(h["authorization"] == f"Bearer {KEY}" for _, _, h, _ in endpoint.requests)
    assert "Answer yes only if the answer" in chats[0]["messages"][0]["content"]  # the default rubric
    assert '"expected_facts": [\n    "9"\n  ]' in chats[2]["messages"][-1]["content"]  # `exact` is a fact
    assert "OPENAI_API_KEY" not in os.environ  # lent to MLflow while judging only
    assert not fetched


def test_max_rows_judges_the_same_first_task_rows_for_every_model(endpoint, key, tmp_path):
    values = judge_answers(
        _cfg(endpoint.base_url, max_rows=2), ROWS, {"base": POOR, "candidate": GOOD}, out_dir=tmp_path
    )
    assert values == {"base": [0.0, 1.0], "candidate": [1.0, 1.0]}
    assert len(endpoint.chats()) == 4


def test_a_gate_decides_on_the_llm_judges_verdicts(endpoint, key, tmp_path):
    evaluate = EvaluateSection(llm_judge=_cfg(endpoint.base_url))
    gates = [
        GateSpec(metric="llm_judge_pass", op=">=", threshold=0.9),
        GateSpec(metric="llm_judge_pass", op=">=", baseline="base", min_delta=0.5),
    ]

    def verdict(answers: dict[str, list[str]]):
        per_row = judge_answers(evaluate.llm_judge, ROWS, answers, out_dir=tmp_path)
        per_row = {label: {"llm_judge_pass": v} for label, v in per_row.items()}
        report = summarise_report(
            evaluate,
            per_row,
            {k: {} for k in per_row},
            {k: {} for k in per_row},
            1,
            n_prompts=4,
            samples_path="-",
        )
        assert report.methods["candidate"]["llm_judge_pass"] == "wilson"
        return apply_gates(gates, report)

    better = verdict({"base": POOR, "candidate": GOOD})  # 3/3 against 1/3
    assert better.passed and [r.passed for r in better.results] == [True, True]
    worse = verdict({"base": GOOD, "candidate": POOR})  # 1/3 against 3/3
    assert not worse.passed and [r.passed for r in worse.results] == [False, False]
    assert worse.results[0].value == pytest.approx(1 / 3)


def test_an_unreachable_endpoint_fails_before_any_verdict_naming_it_and_is_retried(key, tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    with pytest.raises(
        LLMJudgeUnavailable, match=rf"endpoint {re.escape(url)} did not answer.*start the server"
    ) as exc:
        judge_answers(_cfg(url, timeout_s=5), ROWS, {"candidate": GOOD}, out_dir=tmp_path)
    assert is_transient(exc.value)  # a ConnectionError: Prefect runs the stage again
    assert not (tmp_path / RATIONALES).exists()


def test_a_refused_or_missing_key_is_a_config_error_that_never_shows_the_key(endpoint, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-wrong-key-4711")
    with pytest.raises(
        ConfigError, match=rf"refused the key in \${KEY_ENV} \(HTTP 401\): set {KEY_ENV}"
    ) as exc:
        check_endpoint(_cfg(endpoint.base_url))
    assert "sk-wrong-key-4711" not in str(exc.value) and not is_transient(exc.value)
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ConfigError, match=rf"the variable {KEY_ENV} is not set: export it"):
        check_endpoint(_cfg(endpoint.base_url))
    no_key = LLMJudgeSection(base_url=endpoint.base_url, model=MODEL)
    with pytest.raises(ConfigError, match=r"wants a key \(HTTP 401\): set evaluate.llm_judge.api_key_env"):
        check_endpoint(no_key)


def test_without_api_key_env_this_environments_openai_key_never_reaches_the_endpoint(monkeypatch, tmp_path):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-real-openai-key-0000")
    with StandInEndpoint(key=None) as endpoint:
        cfg = LLMJudgeSection(base_url=endpoint.base_url, model=MODEL)
        assert judge_answers(cfg, ROWS[:1], {"candidate": GOOD[:1]}, out_dir=tmp_path) == {"candidate": [1.0]}
    sent = [h.get("authorization") for _, _, h, _ in endpoint.requests]
    assert "sk-real-openai-key-0000" not in json.dumps(sent)
    assert os.environ["OPENAI_API_KEY"] == "sk-real-openai-key-0000"  # restored


def test_a_wrong_root_or_a_reply_that_is_no_verdict_fails_clearly(endpoint, key, tmp_path):
    with pytest.raises(ConfigError, match=r"/models answered HTTP 404 without a model list.*ending in /v1"):
        check_endpoint(_cfg(endpoint.base_url.removesuffix("/v1")))
    with StandInEndpoint(reply={"result": "maybe", "rationale": "unsure"}) as vague:
        with pytest.raises(
            LLMJudgeError, match=r"gave no yes/no verdict \(task row 0, candidate\): value 'maybe'"
        ):
            judge_answers(_cfg(vague.base_url), ROWS, {"candidate": GOOD}, out_dir=tmp_path)


def test_a_gate_on_the_llm_judge_without_one_is_refused_at_load(tmp_path):
    gate = "gates=[{metric: llm_judge_pass, op: '>=', threshold: 0.8}]"
    with pytest.raises(ConfigError, match=r"'llm_judge_pass >= 0.8' is decided by the LLM judge.*not set"):
        load_config(overrides=[gate])
    judged = load_config(
        overrides=[
            gate,
            "evaluate.llm_judge={base_url: 'http://127.0.0.1:8000/v1', model: m, api_key_env: K}",
        ]
    )
    assert judged.evaluate.llm_judge.model == "m"
    bad = {"base_url": "http://127.0.0.1:8000/v1/chat/completions", "model": "m", "api_key_env": KEY}
    with pytest.raises(ConfigError, match=r"names the chat endpoint.*api_key_env must be the name") as exc:
        parse_config({"evaluate": {"llm_judge": bad}})
    assert KEY not in str(exc.value)  # a key pasted in place of its variable's name is not echoed
    misplaced = {"base_url": "http://h/v1", "model": "m", "api_key": KEY}
    with pytest.raises(
        ConfigError, match=r"llm_judge.api_key: unknown key; did you mean 'api_key_env'\?$"
    ) as exc:
        parse_config({"evaluate": {"llm_judge": misplaced}})
    assert KEY not in str(exc.value)


def test_evaluation_scores_every_model_with_the_llm_judge_and_logs_the_rationales(
    stage_inputs, endpoint, key, tmp_path
):
    cfg, base, dataset, _ = stage_inputs
    evaluate = cfg.evaluate.model_copy(update={"llm_judge": _cfg(endpoint.base_url, max_rows=6)})
    models = {"base": base, "candidate": base}
    report = evaluate_models(evaluate, dataset, models, None, out_dir=tmp_path / "e", seed=1)

    samples = [json.loads(x) for x in Path(report.samples_path).read_text().splitlines()]
    task = [i for i, s in enumerate(samples) if s["set"] == "task"][:6]
    values = json.loads(Path(report.per_row_path).read_text())["values"]
    for label in models:
        facts = [
            samples[i].get("expected_any", []) + ([samples[i]["exact"]] if "exact" in samples[i] else [])
            for i in task
        ]
        expected = [float(rule(samples[i][label], f) == "yes") for i, f in zip(task, facts, strict=True)]
        assert values[label]["llm_judge_pass"] == expected
        assert report.counts[label]["llm_judge_pass"] == 6
        assert report.methods[label]["llm_judge_pass"] == "wilson"
    assert "llm_judge_pass" in report.deltas["base"]
    lines = [json.loads(x) for x in (tmp_path / "e" / RATIONALES).read_text().splitlines()]
    assert [(x["row"], x["model"]) for x in lines] == [(i, label) for label in models for i in task]

    # The rationales reach MLflow with the evaluation's other files; the key reaches no file, no stage
    # key and no MLflow artifact (only its variable's name does).
    import mlflow

    from flows.reporting import log_report

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        experiment = mlflow.create_experiment("llm-judge", artifact_location=str(tmp_path / "art"))
        with mlflow.start_run(experiment_id=experiment) as run:
            log_report(report)
        logged = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "evaluation")}
    finally:
        mlflow.set_tracking_uri(previous)
    assert f"evaluation/{RATIONALES}" in logged
    written = [p for root in (tmp_path / "e", tmp_path / "art") for p in root.rglob("*") if p.is_file()]
    assert written and not [p for p in written if KEY.encode() in p.read_bytes()]
    full = parse_config({"evaluate": {"llm_judge": evaluate.llm_judge.model_dump()}})
    assert KEY not in json.dumps(full.model_dump(mode="json")) and KEY_ENV in json.dumps(
        full.model_dump(mode="json")
    )
    ctx = {"dataset": dataset, "models": models, "reward": None, "judge": None, "champion_version": None}
    off = parse_config({})
    assert stage_key(BY_NAME["evaluate"], full, ctx, "c") != stage_key(BY_NAME["evaluate"], off, ctx, "c")


def test_evaluation_stops_before_generating_when_the_endpoint_is_down(stage_inputs, key, tmp_path):
    cfg, base, dataset, _ = stage_inputs
    down = _cfg(f"http://127.0.0.1:{_closed_port()}/v1", timeout_s=5)
    evaluate = cfg.evaluate.model_copy(update={"llm_judge": down})
    with pytest.raises(LLMJudgeUnavailable, match="did not answer"):
        evaluate_models(evaluate, dataset, {"base": base}, None, out_dir=tmp_path / "e", seed=1)
    assert not (tmp_path / "e" / "samples.jsonl").exists()
