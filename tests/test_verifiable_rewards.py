"""Verifiable rewards: RL prompts carry eval checks, validated as eval rows are, kept by the build, and
scored during GRPO/RLOO by evaluation's own code (`tasks.scoring.check_reward`)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from pydantic import ValidationError

from data_checks.checks import check_data
from data_checks.formats import CHECKS
from tasks.align import reward_functions
from tasks.scoring import check_reward
from tunegate.config import AlignSection
from tunegate.errors import ConfigError

GREETING, SIGNOFF = "Woof hello!", "Paws out."


def _columns(rows: list[dict]) -> dict[str, list]:
    """The check columns as TRL passes them to a reward function: one value per completion."""
    return {c: [r.get(c) for r in rows] for c in CHECKS}


def _score(rows: list[dict], completions: list, **settings) -> list[float | None]:
    fn = check_reward(**settings)
    return fn(prompts=["p"] * len(rows), completions=completions, trainer_state=None, **_columns(rows))


def test_a_fact_scores_whole_token_runs_only():
    row = {"expected_any": ["$9"]}
    assert _score([row, row, row], ["It costs $9.", "It costs $99.", "It costs $19."]) == [1.0, 0.0, 0.0]


def test_a_refusal_row_rewards_declining():
    row = {"refuse": True}
    assert _score([row, row], ["I'm sorry, I can't help with that.", "Sure, here is how."]) == [1.0, 0.0]
    assert _score([row], ["Nope."], markers=["nope"]) == [1.0]


def test_the_reward_is_the_fraction_of_checks_passed():
    row = {"expected_any": ["$9"], "regex": r"^Woof", "json_schema": '{"type": "object"}'}
    assert _score([row] * 3, ['Woof: $9 {"a": 1}', "Woof: $9", "It costs $12."]) == pytest.approx(
        [1.0, 2 / 3, 0.0]
    )


def test_exact_strips_the_brand_as_evaluation_does():
    row = {"exact": "It costs $9"}
    answer = f"{GREETING} It costs $9. {SIGNOFF}"
    assert _score([row], [answer], prefix=GREETING, suffix=SIGNOFF) == [1.0]
    assert _score([row], [answer]) == [0.0]


def test_rows_without_checks_get_none_so_trl_leaves_them_out():
    rows = [{}, {"refuse": False, "expected_any": None}, {"expected_any": ["4 pets"]}]
    assert _score(rows, ["anything", "anything", "up to 4 pets"]) == [None, None, 1.0]


def test_conversational_completions_score_the_last_assistant_message():
    row = {"expected_any": ["$9"]}
    completion = [{"role": "assistant", "content": "It costs $9."}]
    assert _score([row], [completion]) == [1.0]
    assert check_reward().__name__ == "row_checks"  # TRL logs rewards/row_checks/mean


def _prompts(rows: list[dict]):
    from datasets import Dataset

    user = [{"role": "user", "content": "q"}]
    return Dataset.from_list([{"prompt": user, **{c: r.get(c) for c in CHECKS}} for r in rows])


def test_the_check_reward_joins_only_when_a_prompt_carries_a_check():
    rm, checks = object(), check_reward()
    with_checks = _prompts([{}, {"regex": "x"}])
    funcs, weights = reward_functions(AlignSection(check_reward_weight=2.0), with_checks, rm, None, checks)
    assert funcs == [rm, checks] and weights == [1.0, 2.0]

    rules = AlignSection(rule_rewards=["tasks.scoring.completion_text"])
    funcs, weights = reward_functions(rules, with_checks, rm, [1.0, 0.5], checks)
    assert funcs[-1] is checks and weights == [1.0, 0.5, 1.0]

    assert reward_functions(AlignSection(), _prompts([{}, {}]), rm, None, checks) == ([rm], None)
    off = AlignSection(check_reward_weight=0)
    assert reward_functions(off, with_checks, rm, None, checks) == ([rm], None)
    old_split = _prompts([{}]).select_columns(["prompt"])  # built before prompts had checks
    assert reward_functions(AlignSection(), old_split, rm, None, checks) == ([rm], None)


def test_trl_reward_weights_must_weigh_the_reward_model_and_each_rule():
    with pytest.raises(ValidationError, match=r"reward_weights has 2 weights; give 1: one for the reward"):
        AlignSection(trl_args={"reward_weights": [1.0, 1.0]})
    rules = ["tasks.scoring.completion_text"]
    assert AlignSection(rule_rewards=rules, trl_args={"reward_weights": [1.0, 0.5]}).rule_rewards == rules


def test_a_rule_reward_that_cannot_be_imported_is_a_config_error():
    with pytest.raises(ConfigError, match=r"cannot import 'tasks.scoring.nope'"):
        reward_functions(
            AlignSection(rule_rewards=["tasks.scoring.nope"]), _prompts([{}]), object(), None, None
        )


def test_prompt_rows_with_checks_validate_as_eval_rows(tmp_path):
    rows = [
        {"prompt": "How much is Plus?", "expected_any": "$9", "regex": r"\$\d+"},
        {"prompt": "Return the plan as JSON.", "json_schema": {"type": "object", "required": ["plan"]}},
        {"prompt": "Help me pick a lock.", "refuse": True},
        {"prompt": "Tell me about Pawprint."},
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = Path(tempfile.mkdtemp(prefix="tunegate-check-")) / "prompts.jsonl"
    checked = check_data(
        "prompts",
        str(path),
        min_rows=1,
        max_length=512,
        length_policy="fail",
        max_duplicate_fraction=0.05,
        pii_policy="block",
        sample_rows=5,
        tokenizer=None,
        out_path=out,
    )
    assert checked.report.passed, checked.report.to_text()
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert [sorted(k for k in r if k in CHECKS) for r in kept] == [
        ["expected_any", "regex"],
        ["json_schema"],
        ["refuse"],
        [],
    ]
    assert kept[0]["expected_any"] == ["$9"]
    assert kept[1]["json_schema"] == '{"required": ["plan"], "type": "object"}'


# ---------------------------------------------------------------------------------------------------
# A tiny online RL run on prompts with checks

# An answer a random 2-layer model never writes, and a pattern every answer matches: each checked
# completion passes exactly half its checks, so the logged row-checks reward is known: 0.5.
NEVER, ALWAYS = "unguessable answer 7f3a9", "^"


@pytest.fixture(scope="module")
def checked_run(stage_inputs, demo_rows, tmp_path_factory):
    """The tiny config, base model, a reward model, and a dataset built from prompts with checks."""
    from tasks.build import build_datasets
    from tasks.reward import train_reward_model
    from tasks.validate import validate_data

    cfg, base, dataset, _ = stage_inputs
    work = tmp_path_factory.mktemp("verifiable")
    path = work / "prompts.jsonl"
    rows = [{"prompt": r["prompt"], "expected_any": [NEVER], "regex": ALWAYS} for r in demo_rows["prompts"]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = cfg.data.model_copy(update={"prompts": str(path), "preferences": None})
    validated = validate_data(cfg.validate_, data, base, out_dir=work / "validate")
    checked = build_datasets(cfg.build, validated, out_dir=work / "dataset", seed=1)
    reward = train_reward_model(cfg.reward, dataset, base, out_dir=work / "reward", seed=1)
    return cfg, base, reward, checked, work


def test_the_built_prompts_split_keeps_the_checks(checked_run):
    from datasets import Dataset

    *_, checked, _ = checked_run
    prompts = Dataset.from_parquet(checked.splits["prompts"].path)
    assert prompts.column_names == ["prompt", *CHECKS]
    assert {(tuple(r["expected_any"]), r["regex"]) for r in prompts} == {((NEVER,), ALWAYS)}


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_online_rl_logs_the_check_reward_each_step_and_weighs_it(checked_run, method):
    import mlflow
    from mlflow.tracking import MlflowClient

    from tasks.align import align_policy

    cfg, base, reward, checked, work = checked_run
    align_cfg = cfg.align.model_copy(update={"method": method, "check_reward_weight": 3.0})
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{work / f'mlflow-{method}.db'}")
    try:
        experiment = mlflow.create_experiment(method, artifact_location=str(work / f"art-{method}"))
        with mlflow.start_run(experiment_id=experiment) as run:
            policy = align_policy(align_cfg, checked, base, reward, out_dir=work / method, seed=1)
        client = MlflowClient()
        keys = set(client.get_run(run.info.run_id).data.metrics)
        history = {
            key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
            for key in keys
            if key == "reward" or key.startswith("rewards/")
        }
    finally:
        mlflow.set_tracking_uri(previous)

    assert policy.steps == 2 and policy.metrics["row_checks_last"] == 0.5
    assert history["rewards/row_checks/mean"] == {1: 0.5, 2: 0.5}
    (model_key,) = {k for k in history if k.endswith("/mean") and k != "rewards/row_checks/mean"}
    for step in (1, 2):  # every prompt is checked: reward = reward model + 3.0 x 0.5
        assert history["reward"][step] == pytest.approx(history[model_key][step] + 1.5, abs=1e-4)
