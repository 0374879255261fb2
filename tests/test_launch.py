"""The checkpoint directory's claim across processes: a second run with the same inputs trains in a
private directory, and under `accelerate launch` the launching process claims once for all ranks, which
train in the directory it got and claim nothing themselves. The ranks are not started here (a real
two-process launch is in tests/test_training.py): `subprocess.run` is replaced by one that reads the
spec and the environment the ranks would get."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import tasks.launch
from tasks.checkpoints import CLAIMED_CHECKPOINT_DIR, claim_checkpoint_dir, train_resumable
from tasks.launch import launch
from tunegate.artifacts import ModelArtifact
from tunegate.errors import TrainingError

ROOT = Path(__file__).resolve().parents[1]
RECORD = ModelArtifact(path="/nowhere", role="sft", base_model="tiny", digest="d")

HOLDER = r"""
import sys, time
from pathlib import Path
from tasks.checkpoints import claim_checkpoint_dir

ckpt, got, done = (Path(a) for a in sys.argv[1:])
with claim_checkpoint_dir(ckpt) as directory:
    got.write_text(str(directory))
    while not done.exists():
        time.sleep(0.05)
"""


@pytest.fixture
def other_run(tmp_path):
    """Another process with the same inputs, holding the claim on tmp_path/ckpt until the test ends."""
    ckpt, got, done = tmp_path / "ckpt", tmp_path / "other-got", tmp_path / "other-done"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(ckpt), str(got), str(done)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    deadline = time.monotonic() + 60
    while not got.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the other run never claimed"
        time.sleep(0.05)
    assert got.read_text() == str(ckpt)
    yield ckpt
    done.touch()
    proc.wait(timeout=30)


def _fake_ranks(monkeypatch, seen: dict):
    """Stand in for `accelerate launch`: note the spec and environment, answer as the main rank does."""

    def run(cmd, *, env, **_):
        spec, result = Path(cmd[-2]), Path(cmd[-1])
        seen.update(
            cmd=cmd, spec=json.loads(spec.read_text()), env=env, claimed_elsewhere=_claimed_elsewhere(env)
        )
        result.write_text(json.dumps({"artifact": RECORD.model_dump(mode="json")}))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(tasks.launch, "subprocess", SimpleNamespace(run=run, STDOUT=subprocess.STDOUT))


def _claimed_elsewhere(env: dict) -> bool:
    """Whether the claim on the directory the ranks were given is held (by the launching process)."""
    with claim_checkpoint_dir(Path(env[CLAIMED_CHECKPOINT_DIR])) as directory:
        return directory != Path(env[CLAIMED_CHECKPOINT_DIR])


def test_a_claimed_directory_sends_a_second_run_to_a_private_one(tmp_path, other_run):
    with claim_checkpoint_dir(other_run) as directory:
        assert directory == tmp_path / f"ckpt-pid{os.getpid()}"
    with claim_checkpoint_dir(tmp_path / "free") as directory:
        assert directory == tmp_path / "free"


def test_a_launch_while_another_run_holds_the_claim_gives_its_ranks_a_private_dir(
    tmp_path, monkeypatch, other_run
):
    seen: dict = {}
    _fake_ranks(monkeypatch, seen)
    kwargs = {"out_dir": tmp_path / "out", "seed": 1, "checkpoint_dir": other_run}
    assert launch("sft", (RECORD,), kwargs, gpus=2, accelerate_config=None) == RECORD
    private = str(tmp_path / f"ckpt-pid{os.getpid()}")
    assert seen["spec"]["kwargs"]["checkpoint_dir"] == private
    assert seen["env"][CLAIMED_CHECKPOINT_DIR] == private


def test_a_launch_holds_the_claim_for_its_ranks_until_they_end(tmp_path, monkeypatch):
    seen: dict = {}
    _fake_ranks(monkeypatch, seen)
    launch("sft", (RECORD,), {"out_dir": tmp_path / "out", "seed": 1}, gpus=2, accelerate_config=None)
    shared = str(tmp_path / "out" / "trainer")  # the stages' default
    assert (
        seen["spec"]["kwargs"]["checkpoint_dir"] == shared and seen["env"][CLAIMED_CHECKPOINT_DIR] == shared
    )
    assert seen["claimed_elsewhere"]  # held while the ranks ran
    with claim_checkpoint_dir(Path(shared)) as directory:
        assert directory == Path(shared)  # and free once they ended


class _Trainer:
    def __init__(self, output_dir: Path) -> None:
        self.args = SimpleNamespace(output_dir=str(output_dir), max_steps=2)
        self.trained_in: str | None = None

    def add_callback(self, callback) -> None:
        pass

    def train(self, resume_from_checkpoint=None) -> str:
        self.trained_in = self.args.output_dir
        return "trained"


def test_launched_ranks_train_in_the_directory_their_launcher_claimed_and_claim_nothing(
    tmp_path, monkeypatch, other_run
):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(CLAIMED_CHECKPOINT_DIR, str(other_run))  # held by "the launcher"
    trainer = _Trainer(other_run)
    assert train_resumable(trainer, other_run) == ("trained", 0, other_run)

    monkeypatch.delenv(CLAIMED_CHECKPOINT_DIR)
    with pytest.raises(TrainingError, match=r"one of 2 launched ranks, but no launcher claimed"):
        train_resumable(_Trainer(tmp_path / "x"), tmp_path / "x")


def test_a_run_in_process_trains_in_a_private_dir_while_another_holds_the_claim(tmp_path, other_run):
    trainer = _Trainer(other_run)
    _, resumed, used = train_resumable(trainer, other_run)
    assert used == tmp_path / f"ckpt-pid{os.getpid()}" and trainer.trained_in == str(used) and resumed == 0


def test_a_rank_out_of_memory_comes_back_saying_what_to_lower(tmp_path, monkeypatch):
    import torch

    from tasks import launch as launch_module
    from tunegate import errors
    from tunegate.errors import OutOfMemory

    def runs_out(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 502.00 MiB")

    monkeypatch.setattr(launch_module, "stage_function", lambda stage: runs_out)
    monkeypatch.setenv("RANK", "1")
    spec = tmp_path / "launch.json"
    spec.write_text(json.dumps({"stage": "sft", "args": [None, None, None], "kwargs": {}}))
    result = tmp_path / "launch.result.json"
    assert launch_module.main([str(spec), str(result)]) == 1
    error = errors.from_outcome(json.loads((tmp_path / "launch.result.rank1.json").read_text()))
    assert isinstance(error, OutOfMemory)
    assert "sft.per_device_train_batch_size" in str(error) and "Not retried" in str(error)


def test_a_stage_in_a_child_process_gets_its_threads_and_its_launchers_claim(tmp_path, monkeypatch):
    """Stages trained side by side (run.parallel_stages) each run as one plain child process, limited
    to its share of the CPU threads, training in the directory the parent claimed for it."""
    seen: dict = {}
    _fake_ranks(monkeypatch, seen)
    kwargs = {"out_dir": tmp_path / "out", "seed": 1}
    assert launch("reward-model", (RECORD,), kwargs, gpus=1, accelerate_config=None, threads=1) == RECORD
    assert "accelerate" not in " ".join(seen["cmd"]) and seen["cmd"][1:3] == ["-m", "tasks.launch"]
    assert seen["env"]["OMP_NUM_THREADS"] == "1" and seen["env"]["MKL_NUM_THREADS"] == "1"
    assert seen["claimed_elsewhere"] and seen["spec"]["stage"] == "reward-model"


def test_a_child_process_trains_in_the_directory_its_launcher_claimed(tmp_path, monkeypatch, other_run):
    """WORLD_SIZE unset (one child, not launched ranks): the launcher's claim is used, not a private
    directory beside it, so a stage started again resumes its checkpoints."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv(CLAIMED_CHECKPOINT_DIR, str(other_run))  # held by "the launcher"
    assert train_resumable(_Trainer(other_run), other_run) == ("trained", 0, other_run)
