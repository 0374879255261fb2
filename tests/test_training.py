"""Training as practitioners run it, on the tiny model (CPU): what trains in each mode, adapter or
merged saving, early stopping, packing, the reward model's gates, DPO, the reward-hacking guard,
resuming after SIGKILL, and the multi-process `accelerate launch` path (torchrun over gloo)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tasks.align import align_policy, check_guard
from tasks.launch import launch, launch_command
from tasks.launch import main as launch_main
from tasks.model_io import load_causal_lm
from tasks.reward import check_reward_model, length_bias
from tasks.sft import train_sft
from tunegate.artifacts import BASE_REF
from tunegate.config import AlignSection, RewardSection, SftSection
from tunegate.errors import ConfigError, StageGateFailed

ROOT = Path(__file__).resolve().parents[1]


def _sft_cfg(stage_inputs, **update) -> SftSection:
    return SftSection.model_validate({**stage_inputs[0].sft.model_dump(), **update})


def _train(stage_inputs, out: Path, **update):
    _, base, dataset, _ = stage_inputs
    return train_sft(_sft_cfg(stage_inputs, **update), dataset, base, out_dir=out, seed=1)


def _changed(a: str, b: str) -> set[str]:
    wa, wb = load_file(f"{a}/model.safetensors"), load_file(f"{b}/model.safetensors")
    return {k for k in wa if k in wb and not torch.equal(wa[k], wb[k])}


def test_full_mode_trains_every_layer_and_partial_only_the_top(stage_inputs, tmp_path):
    base = stage_inputs[1]
    full = _train(stage_inputs, tmp_path / "full", mode="full")
    changed = _changed(base.path, full.path)
    assert any(".layers.0." in k for k in changed) and any(".layers.1." in k for k in changed)

    partial = _train(stage_inputs, tmp_path / "partial", mode="partial", trainable_layers=1)
    changed = _changed(base.path, partial.path)
    assert changed and all(".layers.1." in k or k.endswith("norm.weight") for k in changed)
    assert not any(".layers.0." in k or "embed" in k for k in changed)
    assert partial.metrics["trainable_params"] < full.metrics["trainable_params"]


def test_dora_trains_adapters(stage_inputs, tmp_path):
    dora = _train(stage_inputs, tmp_path / "dora", mode="dora")
    assert dora.steps == 2 and dora.metrics["weights_delta"] > 0
    assert _changed(stage_inputs[1].path, dora.path)


def test_qlora_without_cuda_is_a_clear_config_error(stage_inputs, tmp_path):
    with pytest.raises(ConfigError, match="sft.mode=qlora needs a CUDA GPU.*use sft.mode=lora"):
        _train(stage_inputs, tmp_path / "q", mode="qlora")
    assert not (tmp_path / "q").exists()


def test_adapter_save_keeps_base_identity_and_loads_like_merged(stage_inputs, tmp_path):
    base = stage_inputs[1]
    merged = _train(stage_inputs, tmp_path / "merged", save="merged")
    adapter = _train(stage_inputs, tmp_path / "adapter", save="adapter")
    files = {p.name for p in Path(adapter.path).iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", BASE_REF} <= files
    assert "model.safetensors" not in files
    ref = json.loads((Path(adapter.path) / BASE_REF).read_text())
    assert ref["digest"] == base.digest and ref["path"] == base.path
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    logits = [load_causal_lm(p)[0](ids).logits for p in (merged.path, adapter.path)]
    assert torch.allclose(logits[0], logits[1], atol=1e-5)


def test_adapter_save_needs_an_adapter_mode():
    with pytest.raises(ValueError, match="save=adapter needs an adapter mode"):
        SftSection(mode="full", save="adapter")


def test_early_stopping_stops_when_eval_loss_stalls_and_keeps_the_best(stage_inputs, tmp_path):
    sft = _train(
        stage_inputs,
        tmp_path / "es",
        max_steps=30,
        early_stopping_patience=2,
        early_stopping_min_delta=100.0,  # no evaluation can improve by this much
        eval_steps=1,
    )
    assert sft.steps == 3  # the first evaluation sets the best, two more without improvement stop it
    assert 1 <= sft.metrics["best_step"] <= 3  # the best evaluation was restored


def test_packing_trains_with_the_completion_mask(stage_inputs, tmp_path):
    packed = _train(stage_inputs, tmp_path / "packed", packing=True)
    assert packed.steps == 2 and math.isfinite(packed.metrics["train_loss"])
    assert packed.metrics["weights_delta"] > 0


def _pairs(lengths: list[tuple[int, int]]) -> list[dict]:
    user = [{"role": "user", "content": "q"}]
    return [
        {
            "prompt": user,
            "chosen": [{"role": "assistant", "content": "c" * c}],
            "rejected": [{"role": "assistant", "content": "r" * r}],
        }
        for c, r in lengths
    ]


def test_reward_model_that_rewards_length_is_rejected():
    # 12 pairs where the better answer is longer, 10 where it is shorter.
    pairs = _pairs([(40, 10)] * 12 + [(10, 40)] * 10)
    cfg = RewardSection(min_accuracy=0.5)
    by_length = length_bias(
        pairs,
        [len(p["chosen"][0]["content"]) for p in pairs],
        [len(p["rejected"][0]["content"]) for p in pairs],
    )
    assert by_length["longer_preferred"] == 1.0 and by_length["labels_longer"] == pytest.approx(12 / 22)
    assert by_length["accuracy_chosen_shorter"] == 0.0 and by_length["pair_accuracy"] == pytest.approx(
        12 / 22
    )
    with pytest.raises(StageGateFailed, match="length bias \\+0.45 above reward.max_length_bias=0.1") as exc:
        check_reward_model(cfg, {**by_length, "eval_pairs": 22.0})
    assert "right only 0% of the time (10 pairs)" in str(exc.value)

    good = length_bias(pairs, [1.0] * 22, [0.0] * 22)
    assert good["length_bias"] == 0.0 and good["accuracy_chosen_shorter"] == 1.0
    check_reward_model(cfg, {**good, "eval_pairs": 22.0})  # passes


def test_reward_hacking_guard_trips_only_when_reward_rises_as_quality_falls():
    cfg = AlignSection()
    base = {"guard.sft.eval_loss": 1.0, "guard.sft.answer_tokens": 20.0, "guard.sft.reward": 0.5}
    longer = {**base, "guard.aligned.eval_loss": 1.05, "guard.aligned.answer_tokens": 45.0}
    with pytest.raises(StageGateFailed, match=r"reward rose 0.500 -> 2.000 .*answers grew 2.25x"):
        check_guard(cfg, {**longer, "guard.aligned.reward": 2.0})
    check_guard(cfg, {**longer, "guard.aligned.reward": 0.4})  # longer but not rewarded: not hacking
    worse = {
        **base,
        "guard.aligned.eval_loss": 1.5,
        "guard.aligned.answer_tokens": 20.0,
        "guard.aligned.reward": 0.9,
    }
    with pytest.raises(StageGateFailed, match="held-out loss rose by 0.500"):
        check_guard(cfg, worse)
    check_guard(
        cfg,
        {
            **base,
            "guard.aligned.eval_loss": 1.1,
            "guard.aligned.answer_tokens": 25.0,
            "guard.aligned.reward": 3.0,
        },
    )


def test_dpo_aligns_on_preference_pairs_without_a_reward_model(stage_inputs, tmp_path):
    cfg, base, dataset, _ = stage_inputs
    sft = _train(stage_inputs, tmp_path / "sft")
    assert sft.trust_remote_code is base.trust_remote_code is False
    dpo_cfg = AlignSection.model_validate({**cfg.align.model_dump(), "method": "dpo", "beta": 0.1})
    trusted = sft.model_copy(update={"trust_remote_code": True})  # as from model.trust_remote_code: true
    aligned = align_policy(dpo_cfg, dataset, trusted, None, out_dir=tmp_path / "dpo", seed=1)
    assert aligned.trust_remote_code is True  # a model trained from a trusted one inherits it
    assert aligned.steps == 2 and aligned.metrics["weights_delta"] > 0
    assert "reward_margin_last" in aligned.metrics and "guard.aligned.eval_loss" in aligned.metrics
    assert _changed(sft.path, aligned.path)


CHILD = """
import json, sys, time
from pathlib import Path
import tasks.sft, tasks.training
from tunegate.artifacts import InstructionDataset, ModelArtifact
from tunegate.config import SftSection

spec = json.loads(Path(sys.argv[1]).read_text())
Guard = type(tasks.training.finite_loss_guard())

class SlowGuard(Guard):  # fault injection: slow steps, so the parent can kill mid-run
    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(0.3)

tasks.sft.finite_loss_guard = SlowGuard
tasks.sft.train_sft(
    SftSection.model_validate(spec["cfg"]), InstructionDataset.model_validate(spec["data"]),
    ModelArtifact.model_validate(spec["base"]), out_dir=Path(spec["out"]), seed=1,
    checkpoint_dir=Path(spec["ckpt"]),
)
"""


@pytest.mark.integration  # subprocesses: a SIGKILL drill, a two-process launch
def test_sft_killed_mid_run_resumes_from_its_last_checkpoint(stage_inputs, tmp_path):
    _, base, dataset, _ = stage_inputs
    cfg = _sft_cfg(stage_inputs, max_steps=12, checkpoint_steps=3)
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "cfg": cfg.model_dump(mode="json"),
                "data": dataset.model_dump(mode="json"),
                "base": base.model_dump(mode="json"),
                "out": str(out),
                "ckpt": str(ckpt),
            }
        )
    )
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(spec)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    deadline = time.time() + 120
    while not (ckpt / "checkpoint-6" / "trainer_state.json").exists():
        assert child.poll() is None and time.time() < deadline, "the child ended before its second checkpoint"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
    assert not (out / "model").exists()  # nothing half-saved

    resumed = train_sft(cfg, dataset, base, out_dir=out, seed=1, checkpoint_dir=ckpt)
    assert resumed.steps == 12 and resumed.metrics["resumed_from_step"] >= 6
    assert not ckpt.exists()  # checkpoints are cleared once the result is saved

    straight = train_sft(
        cfg, dataset, base, out_dir=tmp_path / "straight", seed=1, checkpoint_dir=tmp_path / "c2"
    )
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    a, b = (load_causal_lm(m.path)[0](ids).logits for m in (resumed, straight))
    assert torch.allclose(a, b, atol=1e-4)


def test_launch_command_uses_the_accelerate_config_when_given(tmp_path):
    cmd = launch_command(8, "configs/accelerate/fsdp.yaml", tmp_path / "s.json", tmp_path / "r.json")
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and cmd[3:5] == ["--num_processes", "8"]
    assert cmd[5:7] == ["--config_file", "configs/accelerate/fsdp.yaml"] and "--multi_gpu" not in cmd
    assert cmd[-4:] == ["-m", "tasks.launch", str(tmp_path / "s.json"), str(tmp_path / "r.json")]
    assert "--multi_gpu" in launch_command(2, None, tmp_path / "s.json", tmp_path / "r.json")


def test_a_failing_worker_rank_reports_its_error_even_if_the_main_process_is_stopped(
    stage_inputs, tmp_path, monkeypatch
):
    # torchrun stops rank 0 as soon as rank 1 exits; the parent must still get rank 1's error
    _, base, dataset, _ = stage_inputs
    spec, result = tmp_path / "launch.json", tmp_path / "launch.result.json"
    cfg = _sft_cfg(stage_inputs, mode="qlora")
    spec.write_text(
        json.dumps(
            {
                "stage": "sft",
                "args": [a.model_dump(mode="json") for a in (cfg, dataset, base)],
                "kwargs": {"out_dir": str(tmp_path / "out"), "seed": 1},
            }
        )
    )
    monkeypatch.setenv("RANK", "1")
    assert launch_main([str(spec), str(result)]) == 1
    assert not result.exists()
    outcome = json.loads((tmp_path / "launch.result.rank1.json").read_text())
    assert outcome["error"] == "ConfigError" and "qlora needs a CUDA GPU" in str(outcome["problems"])


@pytest.mark.integration  # subprocesses: a SIGKILL drill, a two-process launch
def test_two_process_launch_trains_and_returns_the_main_process_result(stage_inputs, tmp_path):
    _, base, dataset, _ = stage_inputs
    cfg = _sft_cfg(stage_inputs)
    kwargs = {"out_dir": tmp_path / "out", "seed": 1, "checkpoint_dir": tmp_path / "ckpt"}
    sft = launch("sft", (cfg, dataset, base), kwargs, gpus=2, accelerate_config=None)
    assert sft.steps == 2 and Path(sft.path, "model.safetensors").exists()
    log = (tmp_path / "out" / "launch.log").read_text()
    assert log.count("sft done") == 2  # two processes trained, in step (DDP)

    with pytest.raises(ConfigError, match="sft.mode=qlora needs a CUDA GPU"):
        launch(
            "sft",
            (_sft_cfg(stage_inputs, mode="qlora"), dataset, base),
            kwargs,
            gpus=2,
            accelerate_config=None,
        )


def test_a_corrupted_checkpoint_is_set_aside_and_the_stage_resumes_from_the_one_before(
    stage_inputs, tmp_path, monkeypatch, caplog
):
    import tasks.sft

    _, base, dataset, _ = stage_inputs
    cfg = _sft_cfg(stage_inputs, max_steps=4, checkpoint_steps=2)
    ckpt = tmp_path / "ckpt"
    with monkeypatch.context() as m:  # as if the run died right after its last checkpoint
        m.setattr(tasks.sft, "finish_checkpoints", lambda _: None)
        train_sft(cfg, dataset, base, out_dir=tmp_path / "first", seed=1, checkpoint_dir=ckpt)
    assert {p.name for p in ckpt.iterdir() if p.name.startswith("checkpoint-")} == {
        "checkpoint-2",
        "checkpoint-4",
    }
    weights = ckpt / "checkpoint-4" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(8)  # a flipped tail: the file still parses, only its checksum tells
    weights.write_bytes(bytes(data))

    caplog.set_level("WARNING", logger="tasks.checkpoints")
    resumed = train_sft(cfg, dataset, base, out_dir=tmp_path / "again", seed=1, checkpoint_dir=ckpt)
    assert resumed.steps == 4 and resumed.metrics["resumed_from_step"] == 2
    assert "checkpoint-4 is corrupted (adapter_model.safetensors does not match its checksum)" in caplog.text
    assert "falling back to the previous checkpoint" in caplog.text


def test_every_checkpoint_corrupted_starts_the_stage_fresh_and_says_so(stage_inputs, tmp_path, caplog):
    from tasks.checkpoints import CHECKSUMS, last_checkpoint

    ckpt = tmp_path / "ckpt" / "checkpoint-2"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text('{"global_step": 2')  # cut short mid-write
    (ckpt / "model.safetensors").write_bytes(b"x")
    (ckpt / CHECKSUMS).write_text("{}")
    caplog.set_level("WARNING", logger="tasks.checkpoints")
    assert last_checkpoint(tmp_path / "ckpt") is None
    assert "unreadable state" in caplog.text and "starting the stage fresh" in caplog.text
    assert (tmp_path / "ckpt" / "checkpoint-2.corrupt").is_dir()  # kept for a look, out of the way


def test_disk_full_while_writing_a_checkpoint_fails_clearly_and_keeps_the_previous_one(
    stage_inputs, tmp_path, monkeypatch
):
    """The disk filling up is injected (an OSError ENOSPC from the checkpoint save, after part of the
    checkpoint is written): a filesystem of a fixed size needs mount rights the suite does not assume."""
    import errno

    from transformers import Trainer

    from tunegate.errors import TrainingError

    _, base, dataset, _ = stage_inputs
    cfg = _sft_cfg(stage_inputs, max_steps=6, checkpoint_steps=2)
    ckpt = tmp_path / "ckpt"
    real_save = Trainer._save_checkpoint
    saves = []

    def save_until_the_disk_is_full(self, model, trial):
        saves.append(self.state.global_step)
        if len(saves) == 2:
            partial = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            partial.mkdir(parents=True)
            (partial / "adapter_model.safetensors").write_bytes(b"\0" * 64)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, model, trial)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "_save_checkpoint", save_until_the_disk_is_full)
        with pytest.raises(TrainingError, match=r"disk filled up .* checkpoint-2, is kept: free space"):
            train_sft(cfg, dataset, base, out_dir=tmp_path / "out", seed=1, checkpoint_dir=ckpt)
    assert not (tmp_path / "out" / "model").exists()

    # Space freed: the rerun resumes from checkpoint-2, skipping the half-written checkpoint-4.
    resumed = train_sft(cfg, dataset, base, out_dir=tmp_path / "out", seed=1, checkpoint_dir=ckpt)
    assert resumed.steps == 6 and resumed.metrics["resumed_from_step"] == 2
