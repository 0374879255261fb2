"""Deployments against real servers: the stack `tunegate up` starts (a Prefect server, an MLflow
tracking server and a process worker on 127.0.0.1), the deployments `tunegate deploy` registers, and
`finetune` runs that train, gate and register the tiny model: one triggered through the API, one
started from the Prefect UI's run form in a headless Chromium (Debian's `chromium` package)."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import yaml
from mlflow import MlflowClient
from prefect.utilities.templating import apply_values

from flows.cli import main
from flows.deploy import (
    DEFAULT_PRESET,
    GPU_POOLS,
    REPO,
    ServerError,
    deploy,
    read_prefect_file,
)
from flows.stack import local_stack
from tests.conftest import tiny_raw_config
from tunegate.config import load_config, parse_config
from tunegate.errors import ConfigError

# Whole pipeline runs, real servers or subprocess drills: not in `make test-fast`.
pytestmark = pytest.mark.integration

FINETUNE = "tunegate-pipeline/finetune"
NIGHTLY = "tunegate-pipeline/retrain-nightly"
TRAIN = "tunegate-train-stage/train"
TEMPLATES = {name: json.loads((REPO / "deployments" / f).read_text()) for name, (_, f) in GPU_POOLS.items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_up_prints_both_ui_addresses_and_ctrl_c_stops_all_three(tmp_path):
    prefect_port, mlflow_port = _free_port(), _free_port()
    out = tmp_path / "up.out"
    argv = [
        "up",
        "--home",
        str(tmp_path),
        "--prefect-port",
        str(prefect_port),
        "--mlflow-port",
        str(mlflow_port),
    ]
    with open(out, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", *argv], stdout=log, stderr=subprocess.STDOUT, cwd=REPO
        )
    try:
        deadline = time.monotonic() + 300
        while "Ctrl-C stops all three" not in out.read_text() and proc.poll() is None:
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.5)
        text = out.read_text()
        assert f"Prefect UI:  http://127.0.0.1:{prefect_port}" in text, text
        assert f"MLflow UI:   http://127.0.0.1:{mlflow_port}" in text
        for url in (f"http://127.0.0.1:{prefect_port}/api/health", f"http://127.0.0.1:{mlflow_port}/health"):
            with urllib.request.urlopen(url, timeout=10) as response:
                assert response.status == 200, url
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0, out.read_text()
    finally:
        if proc.poll() is None:  # stop it the way a person would, so that it stops its servers
            proc.terminate()
            proc.wait(timeout=90)
    assert "stopped the worker, the MLflow server and the Prefect server" in out.read_text()
    for port in (prefect_port, mlflow_port):  # nothing listens any more
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("stack")
    with local_stack(
        home,
        prefect_port=_free_port(),
        mlflow_port=_free_port(),
        training_pool="gpu",  # a process pool standing in for the GPU pool (run.placement: pools)
        timeout_s=300,
        worker_env={
            "PREFECT_WORKER_QUERY_SECONDS": "1",  # picks a triggered run up within a second
            "TUNEGATE_SCRATCH": str(home / "scratch"),  # the training worker's work directory
            "TUNEGATE_DATA_ROOTS": str(tmp_path_factory.getbasetemp()),  # the tests' data and models
        },
    ) as running:
        yield running


@pytest.fixture(scope="module")
def deployed(stack):
    """`tunegate deploy`, as a person types it, against the stack's server."""
    argv = ["deploy", "--api-url", stack.api_url, "--gpu-pools", f"registry.tracking_uri={stack.mlflow_url}"]
    assert main(argv) == 0
    return stack


@contextlib.contextmanager
def _client(stack):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: stack.api_url}), get_client(sync_client=True) as client:
        yield client


def test_deploy_registers_nightly_cron_with_timezone_limits_and_the_config_form(deployed):
    with _client(deployed) as client:
        finetune = client.read_deployment_by_name(FINETUNE)
        nightly = client.read_deployment_by_name(NIGHTLY)
        queue = client.read_work_queue_by_name("training", work_pool_name="local")
        promote = client.read_global_concurrency_limit_by_name("tunegate-promote-brightpaw-assistant")

    [schedule] = nightly.schedules
    assert schedule.schedule.cron == "0 2 * * *" and schedule.schedule.timezone == "Europe/Berlin"
    assert schedule.active and finetune.schedules == []
    for d in (finetune, nightly):
        assert d.global_concurrency_limit.limit == 1, d.name
        assert d.concurrency_options.collision_strategy == "ENQUEUE"
        # One queue with one slot: the two deployments never train at the same time either.
        assert (d.work_pool_name, d.work_queue_name) == ("local", "training")
        assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
        assert d.enforce_parameter_schema
    assert queue.concurrency_limit == 1 and promote.limit == 1

    # The training stages' deployment (run.placement: pools) sits on the GPU pool, no run form defaults.
    with _client(deployed) as client:
        train = client.read_deployment_by_name(TRAIN)
    assert (train.work_pool_name, train.parameters) == ("gpu", {})
    assert set(train.parameter_openapi_schema["required"]) == {"stage", "spec", "artifact_root", "result"}

    # What prefect.yaml says is what the server holds.
    for spec, d in zip(read_prefect_file(), (finetune, nightly, train), strict=True):
        assert (spec.name, spec.description, spec.entrypoint) == (d.name, d.description, d.entrypoint)
        assert set(spec.tags) == set(d.tags) and d.job_variables == spec.job_variables

    # The run form is drawn from PipelineConfig; its defaults are the preset with the override.
    schema = finetune.parameter_openapi_schema
    assert schema["required"] == ["config"]
    sections = set(schema["definitions"]["PipelineConfig"]["properties"])
    assert {"run", "model", "data", "validate", "sft", "reward", "align", "gates", "registry"} <= sections
    preset = load_config(DEFAULT_PRESET, [f"registry.tracking_uri={deployed.mlflow_url}"])
    assert finetune.parameters == {"config": preset.model_dump(mode="json", by_alias=True)}
    # The nightly retrain lays its own `parameters.config` over the preset: unchanged data, no training.
    nightly_config = preset.model_copy(
        update={"run": preset.run.model_copy(update={"skip_unchanged_data": True})}
    )
    assert nightly.parameters == {"config": nightly_config.model_dump(mode="json", by_alias=True)}


def test_redeploy_updates_the_schedule_in_place(deployed):
    with _client(deployed) as client:
        before = client.read_deployment_by_name(NIGHTLY)
    override = [f"registry.tracking_uri={deployed.mlflow_url}"]
    try:
        ids = deploy(deployed.api_url, overrides=override, timezone="America/New_York")
        assert ids[NIGHTLY] == str(before.id)
        with _client(deployed) as client:
            [schedule] = client.read_deployment_by_name(NIGHTLY).schedules
        assert schedule.schedule.timezone == "America/New_York" and schedule.schedule.cron == "0 2 * * *"
    finally:
        deploy(deployed.api_url, overrides=override)
    with _client(deployed) as client:
        [schedule] = client.read_deployment_by_name(NIGHTLY).schedules
    assert schedule.schedule.timezone == "Europe/Berlin"


def test_deploy_creates_gpu_pools_from_the_job_templates(deployed):
    with _client(deployed) as client:
        for name, (kind, _) in GPU_POOLS.items():
            pool = client.read_work_pool(name)
            assert pool.type == kind and pool.base_job_template == TEMPLATES[name]


def test_gpu_job_templates_request_gpus_when_rendered_with_their_defaults():
    from prefect.server.schemas.actions import validate_base_job_template

    for name, template in TEMPLATES.items():
        assert set(template) == {"job_configuration", "variables"}, name
        validate_base_job_template(template)  # every placeholder is a declared variable
    rendered = {name: apply_values(t["job_configuration"], _defaults(t)) for name, t in TEMPLATES.items()}

    pod = rendered["k8s-gpu"]["job_manifest"]["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    [request] = rendered["docker-gpu"]["container_create_kwargs"]["device_requests"]
    assert request == {"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}


def test_prefect_file_keys_that_deploy_would_not_register_are_refused(tmp_path):
    raw = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    raw["deployments"][0]["triggers"] = [{"enabled": True}]
    del raw["deployments"][1]["concurrency_limit"]
    path = tmp_path / "prefect.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"(?s)finetune.*triggers.*retrain-nightly.*concurrency_limit"):
        read_prefect_file(path)


def test_deploy_to_a_server_that_does_not_answer_says_so():
    with pytest.raises(ServerError, match="does not answer"):
        deploy(f"http://127.0.0.1:{_free_port()}/api")


def test_local_stack_refuses_a_port_in_use(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ServerError, match=f"port {port} on 127.0.0.1 is in use"):
            with local_stack(tmp_path, prefect_port=port, mlflow_port=_free_port()):
                pass


def test_deploy_without_a_server_says_how_to_get_one():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings(restore_defaults={PREFECT_API_URL}),
        pytest.raises(ConfigError, match="tunegate up"),
    ):
        deploy()


def test_finetune_triggered_through_the_api_completes_and_registers_the_champion(
    deployed, tiny_model, data_dir, tmp_path
):
    from prefect.deployments import run_deployment

    raw = tiny_raw_config(tiny_model, data_dir, tmp_path)
    raw["registry"].update(tracking_uri=deployed.mlflow_url, experiment="deployed")
    del raw["registry"]["artifact_root"]  # artifacts go through the tracking server
    with _client(deployed):
        flow_run = run_deployment(FINETUNE, parameters={"config": raw}, timeout=0)
    state = _wait_final(deployed, flow_run.id, timeout_s=600)
    assert state.is_completed(), _diagnose(deployed, flow_run.id, state)

    mlflow = MlflowClient(tracking_uri=deployed.mlflow_url, registry_uri=deployed.mlflow_url)
    champion = mlflow.get_model_version_by_alias("tiny-assistant", "champion")
    assert str(champion.version) == "1"
    assert champion.tags["prefect.flow_run_id"] == str(flow_run.id)
    assert champion.tags["tunegate.config_digest"] == parse_config(raw).digest()
    with _client(deployed) as client:
        finished = client.read_flow_run(flow_run.id)
    assert finished.work_queue_name == "training" and finished.parameters["config"]["run"]["name"] == "test"

    # Triggered again with the same parameters: every data and training stage comes from the cache.
    with _client(deployed):
        again = run_deployment(FINETUNE, parameters={"config": raw}, timeout=0)
    state = _wait_final(deployed, again.id, timeout_s=600)
    assert state.is_completed(), _diagnose(deployed, again.id, state)
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    with _client(deployed) as client:
        task_runs = client.read_task_runs(  # limit and sort given: this client sends nulls the server refuses
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[again.id])),
            sort=TaskRunSort.EXPECTED_START_TIME_ASC,
            limit=100,
        )
    states = {t.name.rsplit("-", 1)[0]: t.state.name for t in task_runs}
    assert {states[s] for s in ("validate", "build", "sft", "reward-model", "align")} == {"Cached"}, states
    assert len(mlflow.search_model_versions("name='tiny-assistant'")) == 1  # nothing new to register


def test_placement_pools_runs_each_training_stage_as_a_flow_run_on_the_training_pool(
    deployed, tiny_model, data_dir, tmp_path
):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.deployments import run_deployment

    raw = tiny_raw_config(tiny_model, data_dir, tmp_path)
    shared = tmp_path / "shared-artifact-root"  # what s3:// or gs:// is between machines
    raw["run"].update(name="pools", placement="pools", artifact_root=str(shared))
    raw["registry"].update(
        tracking_uri=deployed.mlflow_url, experiment="deployed-pools", model_name="pools-assistant"
    )
    del raw["registry"]["artifact_root"]
    with _client(deployed):
        flow_run = run_deployment(FINETUNE, parameters={"config": raw}, timeout=0)
    state = _wait_final(deployed, flow_run.id, timeout_s=600)
    assert state.is_completed(), _diagnose(deployed, flow_run.id, state)

    with _client(deployed) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run.id])
            ),
            sort=FlowRunSort.START_TIME_ASC,
            limit=20,
        )
        train_id = client.read_deployment_by_name(TRAIN).id
    assert [c.parameters["stage"] for c in children] == ["sft", "reward-model", "judge-model", "align"]
    for child in children:
        assert child.deployment_id == train_id and child.work_pool_name == "gpu", child.name
        assert child.state.is_completed(), child.state

    mlflow = MlflowClient(tracking_uri=deployed.mlflow_url, registry_uri=deployed.mlflow_url)
    champion = mlflow.get_model_version_by_alias("pools-assistant", "champion")
    digest = champion.tags["tunegate.candidate_digest"]
    assert (shared / "models" / digest / ".complete").exists()  # the aligned model went through the root
    # The trainers on the training worker logged their curves to the pipeline's stage runs.
    stage_runs = mlflow.search_runs(
        [mlflow.get_experiment_by_name("deployed-pools").experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{champion.tags['tunegate.parent_run_id']}'",
    )
    sft = next(r for r in stage_runs if r.data.tags.get("tunegate.stage") == "sft")
    assert len(mlflow.get_metric_history(sft.info.run_id, "loss")) >= 1, sorted(sft.data.metrics)


def test_the_stack_listens_on_127_0_0_1_only(stack):
    ports = {int(url.rsplit(":", 1)[1]) for url in (stack.prefect_url, stack.mlflow_url)}
    listening: dict[int, set[str]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port = local.split(":")
            if state == "0A" and int(port, 16) in ports:  # LISTEN
                listening.setdefault(int(port, 16), set()).add(address)
    # 0100007F is 127.0.0.1 (little-endian hex); 0.0.0.0 or :: would be every interface
    assert listening == {port: {"0100007F"} for port in ports}, listening


def test_a_run_from_the_form_cannot_read_data_outside_the_workers_data_roots(
    deployed, tiny_model, data_dir, tmp_path
):
    import tempfile
    from pathlib import Path

    from prefect.deployments import run_deployment

    outside = Path(tempfile.mkdtemp(prefix="tunegate-outside-"))  # not under the roots the worker allows
    try:
        shutil.copy(data_dir / "sft.jsonl", outside / "sft.jsonl")
        raw = tiny_raw_config(tiny_model, data_dir, tmp_path)
        raw["data"]["sft"] = str(outside / "sft.jsonl")
        raw["registry"].update(tracking_uri=deployed.mlflow_url, experiment="escape", model_name="escape")
        del raw["registry"]["artifact_root"]
        with _client(deployed):
            flow_run = run_deployment(FINETUNE, parameters={"config": raw}, timeout=0)
        state = _wait_final(deployed, flow_run.id, timeout_s=300)
    finally:
        shutil.rmtree(outside)
    assert state.is_failed(), state
    assert "outside the data roots this worker allows" in state.message, state.message
    mlflow = MlflowClient(tracking_uri=deployed.mlflow_url)
    assert mlflow.get_experiment_by_name("escape") is None  # stopped before anything was written


def test_finetune_started_from_the_ui_run_form_completes_and_registers_the_champion(
    deployed, tiny_model, data_dir, tmp_path
):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail(
            "no `chromium` on PATH: this test drives the system browser through Playwright; "
            "install it with `apt-get install chromium` (.ci/run does)"
        )
    from playwright.sync_api import expect, sync_playwright

    raw = tiny_raw_config(tiny_model, data_dir, tmp_path)
    raw["run"]["name"] = "ui"
    raw["registry"].update(
        tracking_uri=deployed.mlflow_url, experiment="deployed-ui", model_name="ui-assistant"
    )
    del raw["registry"]["artifact_root"]  # artifacts go through the tracking server
    run_name = "finetune-from-the-ui"
    form_png, run_png = tmp_path / "prefect-ui-form.png", tmp_path / "prefect-ui-run.png"

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.route("**/create_flow_run", _retry_busy_database)
            page.goto(f"{deployed.prefect_url}/deployments")
            page.get_by_role("link", name="finetune", exact=True).click()
            page.get_by_role("button", name="Run", exact=True).click()
            page.get_by_role("link", name="Custom run").click()
            # The form drawn from PipelineConfig has a JSON mode, in the menu (its only button)
            # beside the "Parameters" heading: the whole config pasted at once, as a person would.
            page.get_by_role("heading", name="Parameters").locator("xpath=..").get_by_role("button").click()
            page.get_by_role("button", name="Use JSON input").click()
            name_input = page.locator(".flow-run-name-input input")
            name_input.fill(run_name)
            page.locator("form textarea").fill(json.dumps({"config": raw}, indent=2))
            name_input.scroll_into_view_if_needed()  # the page scrolls inside: the form's head
            page.screenshot(path=form_png)
            page.get_by_role("button", name="Submit").click()
            # The UI mounts its toasts twice: either copy will do.
            expect(page.get_by_text(f"{run_name} scheduled to start").first).to_be_visible()

            flow_run = _flow_run_named(deployed, run_name)
            page.goto("about:blank")  # a live Prefect page polls and redraws: CPU the run needs
            state = _wait_final(deployed, flow_run.id, timeout_s=480)
            assert state.is_completed(), _diagnose(deployed, flow_run.id, state)
            page.goto(f"{deployed.prefect_url}/runs/flow-run/{flow_run.id}")
            expect(page.get_by_text("Completed", exact=True).first).to_be_visible()
            page.screenshot(path=run_png)
        finally:
            browser.close()

    for png in (form_png, run_png):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert flow_run.parameters["config"]["run"]["name"] == "ui"
    mlflow = MlflowClient(tracking_uri=deployed.mlflow_url, registry_uri=deployed.mlflow_url)
    champion = mlflow.get_model_version_by_alias("ui-assistant", "champion")
    assert champion.tags["prefect.flow_run_id"] == str(flow_run.id)


def _retry_busy_database(route) -> None:
    """Send the run form's request again while the server answers 503. Prefect's server on SQLite
    answers 503 now and then when two writes meet ("database is locked", rolled back); its Python
    client retries those, its UI does not and shows "Something went wrong"."""
    for _ in range(5):
        response = route.fetch()
        if response.status != 503:
            break
        time.sleep(1)
    route.fulfill(response=response)


def _flow_run_named(stack, name: str):
    """The one flow run of `finetune` called `name`."""
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterName,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    with _client(stack) as client:
        # limit and sort explicit: prefect 3.8.8's sync client sends null for them, which the server rejects
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])),
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[_finetune_id(stack)])),
            sort=FlowRunSort.START_TIME_DESC,
            limit=10,
        )
    assert len(runs) == 1, [(r.name, r.id) for r in runs]
    return runs[0]


def _finetune_id(stack):
    with _client(stack) as client:
        return client.read_deployment_by_name(FINETUNE).id


def _defaults(template: dict) -> dict:
    return {k: v.get("default") for k, v in template["variables"]["properties"].items()}


def _wait_final(stack, flow_run_id, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    with _client(stack) as client:
        while True:
            state = client.read_flow_run(flow_run_id).state
            if state is not None and state.is_final():
                return state
            stack.check_alive()
            if time.monotonic() > deadline:
                pytest.fail(
                    f"flow run still {state.name if state else None}:\n{_diagnose(stack, flow_run_id, state)}"
                )
            time.sleep(2)


def _diagnose(stack, flow_run_id, state) -> str:
    """What a failing run left: its state message, its last logs, the end of the worker's log."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with _client(stack) as client:
        logs = client.read_logs(
            LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200, offset=0
        )
    worker_log = (stack.logs / "worker.log").read_text(errors="replace").splitlines()[-40:]
    return "\n".join(
        [
            f"state: {state}",
            "flow-run logs:",
            *(f"  {log.message}" for log in logs[-40:]),
            "worker:",
            *worker_log,
        ]
    )
