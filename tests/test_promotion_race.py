"""Promotion against a real `mlflow server` on 127.0.0.1 when nothing else is shared: two processes,
each with its own ephemeral Prefect API, race to promote from the same champion and exactly one does;
and the lease that makes that so, kept in the tracking server, is broken once its holder stops
renewing it and never while the holder is alive."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from flows.stack import Service, mlflow_server
from tasks.promotion_lock import BEAT, HOLDER, RELEASED, LockHeld, promotion_lock, registry_lock
from tasks.registry import register_candidate
from tests.test_registry import PROMPT, TAGS, _verdict
from tunegate.artifacts import ModelArtifact
from tunegate.config import RegistrySection

# Whole pipeline runs, real servers or subprocess drills: not in `make test-fast`.
pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
NAME = "raced-assistant"


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    """A real MLflow tracking server, started as `tunegate up` starts it."""
    home = tmp_path_factory.mktemp("mlflow-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd, env = mlflow_server(home, port, os.environ)
    service = Service.start("mlflow-server", cmd, env, home, home)
    try:
        service.wait_healthy(f"http://127.0.0.1:{port}/health", time.monotonic() + 120)
        yield f"http://127.0.0.1:{port}"
    finally:
        service.stop()


def _candidate(tiny_model: Path, digest: str) -> ModelArtifact:
    return ModelArtifact(path=str(tiny_model), role="align", base_model=str(tiny_model), digest=digest)


def _links(url: str, model: str) -> dict[int, dict[str, str]]:
    """The promotion lock's chain of registered models: number -> tags."""
    prefix = f"{model}.promotion-lock."
    found = MlflowClient(url, url).search_registered_models(f"name LIKE '{prefix}%'")
    return {int(m.name.removeprefix(prefix)): m.tags for m in found if m.name.startswith(prefix)}


# One racer. The barrier makes both reach the lock together; the pause between reading the champion
# and moving it holds the compare-and-set open, so two runs that were not excluded would both promote.
RACER = r"""
import contextlib, json, sys, time
from pathlib import Path
import mlflow
import tasks.registry
from tasks.promotion_lock import promotion_lock
from tunegate.artifacts import GateVerdict, ModelArtifact
from tunegate.config import RegistrySection

spec = json.loads(Path(sys.argv[1]).read_text())
reg = RegistrySection.model_validate(spec["registry"])
read_champion = tasks.registry.current_champion

def champion_then_pause(cfg):
    champion = read_champion(cfg)
    time.sleep(spec["pause_s"])
    return champion

tasks.registry.current_champion = champion_then_pause
lock = promotion_lock(reg)

@contextlib.contextmanager
def after_the_barrier():
    Path(spec["ready"]).touch()
    deadline = time.monotonic() + 300
    while not all(Path(p).exists() for p in spec["everyone"]):
        if time.monotonic() > deadline:
            sys.exit("the other racer never reached the lock")
        time.sleep(0.02)
    with lock() as lease:
        yield lease

mlflow.set_tracking_uri(reg.tracking_uri)
mlflow.set_experiment(reg.experiment)
with mlflow.start_run():
    registration = tasks.registry.register_candidate(
        reg, ModelArtifact.model_validate(spec["candidate"]), GateVerdict.model_validate(spec["verdict"]),
        expected_champion=spec["expected"], tags=spec["tags"], smoke_prompt=spec["prompt"],
        lock=after_the_barrier,
    )
Path(spec["result"]).write_text(registration.model_dump_json())
"""


def test_two_processes_on_their_own_prefect_apis_promote_exactly_one(server_url, tiny_model, tmp_path):
    reg = RegistrySection(tracking_uri=server_url, experiment="race", model_name=NAME)
    previous_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(server_url)
    try:
        mlflow.set_experiment("race")
        with mlflow.start_run():  # the champion both racers start from
            first = register_candidate(
                reg,
                _candidate(tiny_model, "champion"),
                _verdict(True),
                expected_champion=None,
                tags=TAGS,
                lock=promotion_lock(reg),
            )
    finally:
        mlflow.set_tracking_uri(previous_uri)
    assert first.promoted and first.version == "1", first.reason

    ready = [tmp_path / f"ready-{i}" for i in range(2)]
    racers = []
    for i in range(2):
        spec = tmp_path / f"racer-{i}.json"
        tags = {**TAGS, "tunegate.candidate_digest": f"candidate-{i}"}
        spec.write_text(
            json.dumps(
                {
                    "registry": reg.model_dump(mode="json"),
                    "candidate": _candidate(tiny_model, f"candidate-{i}").model_dump(mode="json"),
                    "verdict": _verdict(True).model_dump(mode="json"),
                    "expected": "1",
                    "tags": tags,
                    "prompt": PROMPT,
                    "pause_s": 3.0,
                    "ready": str(ready[i]),
                    "everyone": [str(p) for p in ready],
                    "result": str(tmp_path / f"result-{i}.json"),
                }
            )
        )
        # Each its own ephemeral Prefect API: a fresh home and no API URL, as two machines would be.
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        env |= {"PREFECT_HOME": str(tmp_path / f"prefect-{i}"), "PYTHONPATH": str(ROOT)}
        log = open(tmp_path / f"racer-{i}.log", "w")
        racers.append(
            (
                subprocess.Popen(
                    [sys.executable, "-c", RACER, str(spec)], cwd=ROOT, env=env, stdout=log, stderr=log
                ),
                log,
            )
        )
    for proc, log in racers:
        code = proc.wait(timeout=600)
        log.close()
        assert code == 0, Path(log.name).read_text()[-3000:]

    results = [json.loads((tmp_path / f"result-{i}.json").read_text()) for i in range(2)]
    winners = [r for r in results if r["promoted"]]
    assert len(winners) == 1, results  # the old check-then-set promoted both
    [loser] = [r for r in results if not r["promoted"]]
    assert (
        f"champion moved from 1 to {winners[0]['version']} while this run was evaluating" in loser["reason"]
    )

    client = MlflowClient(server_url, server_url)
    aliases = {k: str(v) for k, v in client.get_registered_model(NAME).aliases.items()}
    assert aliases == {"champion": winners[0]["version"], "previous": "1"}
    versions = {str(v.version): v.tags for v in client.search_model_versions(f"name='{NAME}'")}
    assert set(versions) == {"1", "2", "3"} and loser["version"] in versions
    assert {t["tunegate.registration"] for t in versions.values()} == {"complete"}
    # Released, and only the newest link of the lock's chain is left.
    [(_, tags)] = _links(server_url, NAME).items()
    assert tags[RELEASED] == "true"


def test_a_lock_whose_holder_stopped_renewing_is_broken_once_its_lease_runs_out(server_url):
    reg = RegistrySection(tracking_uri=server_url, model_name="stale-holder")
    client = MlflowClient(server_url, server_url)
    # What a run killed inside the lock leaves behind: the newest link, never released or renewed.
    client.create_registered_model(
        "stale-holder.promotion-lock.000000001", tags={HOLDER: "gone:4242:killed", BEAT: "0"}
    )
    start = time.monotonic()
    with registry_lock(reg, timeout_s=60, lease_s=1.5, poll_s=0.1)() as lease:
        waited = time.monotonic() - start
        assert lease.lost() is None
        links = _links(server_url, "stale-holder")
        assert set(links) == {1, 2} and links[2][HOLDER] != "gone:4242:killed"
    assert 1.5 <= waited < 30  # a whole lease without a renewal, then at once
    assert {n: t[RELEASED] for n, t in _links(server_url, "stale-holder").items()} == {2: "true"}


def test_a_lock_whose_holder_is_alive_is_not_broken(server_url):
    reg = RegistrySection(tracking_uri=server_url, model_name="live-holder")
    with registry_lock(reg, lease_s=3.0, poll_s=0.1)() as lease:
        start = time.monotonic()
        with pytest.raises(
            LockHeld, match=r"held the promotion lock live-holder\.promotion-lock\.000000001 "
        ):
            with registry_lock(reg, timeout_s=7, lease_s=3.0, poll_s=0.1)():
                pass
        assert time.monotonic() - start >= 7  # two leases and more: the renewals kept it
        assert lease.lost() is None
        assert int(_links(server_url, "live-holder")[1][BEAT]) >= 5
    start = time.monotonic()
    with registry_lock(reg, timeout_s=7, lease_s=3.0, poll_s=0.1)():  # released: free at once
        assert time.monotonic() - start < 2


HOLDER_PROCESS = r"""
import sys, time
from pathlib import Path
from tasks.promotion_lock import registry_lock
from tunegate.config import RegistrySection

url, held, go, out = sys.argv[1:]
with registry_lock(RegistrySection(tracking_uri=url, model_name="paused-holder"), lease_s=1.5)() as lease:
    Path(held).touch()
    while not Path(go).exists():
        time.sleep(0.05)
    Path(out).write_text(lease.lost() or "held")
"""


def test_a_holder_paused_past_its_lease_knows_it_lost_the_lock_and_its_release_frees_nothing(
    server_url, tmp_path
):
    reg = RegistrySection(tracking_uri=server_url, model_name="paused-holder")
    held, go, out = tmp_path / "held", tmp_path / "go", tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER_PROCESS, server_url, str(held), str(go), str(out)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        deadline = time.monotonic() + 120
        while not held.exists():
            assert holder.poll() is None and time.monotonic() < deadline, "the holder never took the lock"
            time.sleep(0.05)
        holder.send_signal(signal.SIGSTOP)  # a process paused inside the lock (swapping, a debugger)
        with registry_lock(reg, timeout_s=60, lease_s=4.0, poll_s=0.1)() as lease:
            holder.send_signal(signal.SIGCONT)
            go.touch()
            assert holder.wait(timeout=60) == 0
            assert "another run may have taken the promotion lock" in out.read_text()
            # Its release tagged its own, superseded link: the lock is still this holder's.
            assert lease.lost() is None
            with pytest.raises(LockHeld, match="paused-holder.promotion-lock.000000002"):
                with registry_lock(reg, timeout_s=1, lease_s=4.0, poll_s=0.1)():
                    pass
    finally:
        if holder.poll() is None:
            holder.send_signal(signal.SIGCONT)
            holder.kill()


def test_a_local_store_lock_held_past_its_timeout_says_so(tmp_path):
    reg = RegistrySection(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", model_name=NAME)
    with promotion_lock(reg)():
        with pytest.raises(LockHeld, match=f"another process held the promotion lock of {NAME}"):
            with promotion_lock(reg, timeout_s=0.2)():
                pass
    with promotion_lock(reg, timeout_s=0.2)():  # released
        pass
