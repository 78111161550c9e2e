"""Tests for training/runtime.py: checkpoints, RNG restore, exact resume, DeepSpeed on CPU.

Fast tests run single-process on CPU. The ``slow`` ones launch tests/_ds_toy.py with
``accelerate launch`` on 2 CPU processes under DeepSpeed ZeRO-2 (CPU optimizer offload)
and ZeRO-3 -- the way the real training scripts are launched on a GPU-less machine --
and run the 8-GPU config files the same way, shrunk to 2 processes.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from _launch import free_port
from accelerate.state import AcceleratorState
from training.checkpoints import CheckpointManager, relink_schedulers
from training.runtime import (
    log_resolved_config,
    make_accelerator,
    seed_everything,
    unwrap_for_save,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "training" / "configs"


# --------------------------------------------------------------------------- helpers


def fresh_accelerator(**kwargs):
    # accelerate keeps a process-wide singleton; each simulated "run" gets a clean one so
    # save_state/load_state only see that run's model, optimizer and scheduler.
    AcceleratorState._reset_state(reset_partial_state=True)
    return make_accelerator(cpu=True, **kwargs)


def build(accelerator, seed=0):
    seed_everything(seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.2), nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return accelerator.prepare(model, opt, sched)


def train_steps(accelerator, model, opt, sched, start, stop):
    for step in range(start, stop):
        g = torch.Generator().manual_seed(step)  # data is a function of its position
        x = torch.randn(8, 4, generator=g)
        loss = model(x).pow(2).mean()
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()


def draw_rng():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


# --------------------------------------------------------------------------- CheckpointManager


def test_latest_ignores_and_removes_tmp_leftovers(tmp_path):
    acc = fresh_accelerator()
    model, opt, sched = build(acc)
    ckpt = CheckpointManager(tmp_path, keep_last=3)
    assert ckpt.latest() is None
    first = ckpt.save(acc, 1, {"data_position": 10})
    assert first.name == "step_00000001" and (first / "trainer_state.json").is_file()
    assert not list(ckpt.root.glob("*.tmp"))
    # A killed save leaves a newer tmp dir; a stray dir without trainer_state is no checkpoint.
    killed = ckpt.root / "step_00000002.tmp"
    (killed / "pytorch_model").mkdir(parents=True)
    (ckpt.root / "step_00000003").mkdir()
    (ckpt.root / "latest").write_text("step_00000002.tmp\n")  # even a bogus pointer
    assert ckpt.latest(acc) == first
    assert not killed.exists()
    (ckpt.root / "latest").write_text("step_00000009\n")  # pointer to a vanished dir
    assert ckpt.latest() == first


def test_keep_last_pruning_and_pointer(tmp_path):
    acc = fresh_accelerator()
    build(acc)
    ckpt = CheckpointManager(tmp_path, keep_last=2)
    for step in (5, 10, 15, 20):
        ckpt.save(acc, step, {"data_position": step})
    assert [d.name for d in ckpt.checkpoints()] == ["step_00000015", "step_00000020"]
    assert (ckpt.root / "latest").read_text().strip() == "step_00000020"
    assert ckpt.latest() == ckpt.step_dir(20)
    # saving the same step again (e.g. right after a resume) replaces it cleanly
    ckpt.save(acc, 20, {"data_position": 21})
    assert json.loads((ckpt.step_dir(20) / "trainer_state.json").read_text())["data_position"] == 21
    assert not [p for p in ckpt.root.iterdir() if p.suffix in (".tmp", ".old")]


def test_trainer_state_roundtrip(tmp_path):
    acc = fresh_accelerator()
    build(acc)
    ckpt = CheckpointManager(tmp_path)
    extra = {"data_position": {"shard": 3, "offset": 17}, "config": {"lr": 1e-4, "out": tmp_path}}
    path = ckpt.save(acc, 7, extra)
    state = ckpt.load(acc, path)
    assert state["step"] == 7 and state["data_position"] == {"shard": 3, "offset": 17}
    assert state["config"]["out"] == str(tmp_path)  # non-JSON values are stringified
    assert ckpt.load_latest(acc)["step"] == 7
    with pytest.raises(FileNotFoundError):
        ckpt.load(acc, tmp_path / "nope")


def test_rng_states_restored(tmp_path):
    acc = fresh_accelerator()
    build(acc)
    ckpt = CheckpointManager(tmp_path)
    seed_everything(123)
    path = ckpt.save(acc, 1)
    expected = draw_rng()
    for _ in range(5):  # move every generator on
        draw_rng()
    ckpt.load(acc, path)
    assert draw_rng() == expected


def test_resume_matches_uninterrupted_run(tmp_path):
    total, cut = 6, 3
    acc = fresh_accelerator()
    model, opt, sched = build(acc)
    seed_everything(7)
    train_steps(acc, model, opt, sched, 0, total)
    straight = [p.detach().clone() for p in model.parameters()]
    straight_lr = sched.get_last_lr()

    acc = fresh_accelerator()
    model, opt, sched = build(acc)
    seed_everything(7)
    train_steps(acc, model, opt, sched, 0, cut)
    ckpt = CheckpointManager(tmp_path)
    ckpt.save(acc, cut, {"data_position": cut})

    acc = fresh_accelerator()  # a new process: different init, different RNG
    model, opt, sched = build(acc, seed=999)
    random.random(), np.random.rand(), torch.rand(10)
    state = ckpt.load_latest(acc)
    assert state["step"] == cut
    train_steps(acc, model, opt, sched, state["data_position"], total)
    for a, b in zip(straight, model.parameters()):
        assert torch.equal(a, b.detach())
    assert sched.get_last_lr() == straight_lr


# --------------------------------------------------------------------------- other helpers


def test_make_accelerator_single_process_tensorboard(tmp_path):
    AcceleratorState._reset_state(reset_partial_state=True)
    acc = make_accelerator(log_dir=tmp_path / "tb", cpu=True, gradient_accumulation_steps=2)
    assert acc.num_processes == 1 and acc.gradient_accumulation_steps == 2
    assert acc.step_scheduler_with_optimizer is False
    acc.init_trackers("toy", config={"lr": 0.1, "bs": 4})
    acc.log({"loss": 1.0}, step=1)
    acc.end_training()
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))


def test_log_resolved_config_and_unwrap(tmp_path):
    acc = fresh_accelerator()
    model, _, _ = build(acc)
    cfg = {"data": {"root": tmp_path, "sizes": (1, 2)}, "lr": 1e-4, "preset": "tiny"}
    path = log_resolved_config(acc, cfg, tmp_path / "run")
    assert yaml.safe_load(path.read_text()) == {
        "data": {"root": str(tmp_path), "sizes": [1, 2]}, "lr": 1e-4, "preset": "tiny"}
    assert yaml.safe_load((tmp_path / "run" / "runtime.yaml").read_text())["num_processes"] == 1
    module, sd = unwrap_for_save(acc, model)
    assert isinstance(module, nn.Sequential) and set(sd) == set(module.state_dict())
    assert relink_schedulers(acc) == 0  # nothing to fix without DeepSpeed offload


def test_config_files_are_consistent():
    forbidden_with_file = {"gradient_accumulation_steps", "gradient_clipping", "zero_stage",
                           "offload_optimizer_device", "offload_param_device",
                           "zero3_save_16bit_model"}
    for path in sorted(CONFIGS.glob("accelerate_*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        ds = cfg.get("deepspeed_config") or {}
        if "deepspeed_config_file" in ds:
            # accelerate raises at launch if these appear next to a deepspeed_config_file
            assert not forbidden_with_file & set(ds), path.name
            assert "mixed_precision" not in cfg, path.name
            ds_json = json.loads((REPO / ds["deepspeed_config_file"]).read_text())
            assert ds_json["train_micro_batch_size_per_gpu"] == "auto"
            if ds_json["zero_optimization"]["stage"] == 3:
                assert ds_json["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
        if cfg["distributed_type"] == "DEEPSPEED":
            assert cfg.get("use_cpu") is False, path.name  # use_cpu switches DeepSpeed off
    assert (CONFIGS / "slurm_4x8.sh").is_file()


# --------------------------------------------------------------------------- DeepSpeed, 2 processes


def _launch(config: str, outdir: Path, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
           "--num_processes", "2", "--main_process_port", str(free_port()),
           str(REPO / "tests" / "_ds_toy.py"), str(outdir), *extra]
    # the first ZeRO-2 run compiles DeepSpeed's CPU Adam (minutes on 2 cores): allow for it
    timeout = int(os.environ.get("DIVOT_DS_TEST_TIMEOUT", "900"))
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.time() - t0


@pytest.mark.slow
@pytest.mark.parametrize("config", [
    # The cluster files themselves (their json, bf16), shrunk to 2 CPU processes. The two
    # CPU configs (accelerate_cpu_zero{2,3}.yaml) run every real training script instead
    # (tests/test_distributed.py and the scripts' own tests).
    "accelerate_8gpu_zero2.yaml",
    "accelerate_8gpu_zero3.yaml",
])
def test_deepspeed_two_process_train_save_resume(tmp_path, config):
    pytest.importorskip("deepspeed")
    full, t_full = _launch(config, tmp_path)
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-6000:]
    resumed, t_resumed = _launch(config, tmp_path, "--resume-step", "4", "--tag", "resumed")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-6000:]
    print(f"{config}: straight run {t_full:.1f}s, resumed run {t_resumed:.1f}s")

    ckpt = CheckpointManager(tmp_path)
    assert [d.name for d in ckpt.checkpoints()] == ["step_00000004", "step_00000008"]
    assert ckpt.latest() == ckpt.step_dir(8)
    a = json.loads((tmp_path / "result_full.json").read_text())
    b = json.loads((tmp_path / "result_resumed.json").read_text())
    assert a["world_size"] == 2 and "DEEPSPEED" in a["distributed_type"]
    assert a["ds_config"]["train_micro_batch_size_per_gpu"] == 4
    assert a["ds_config"]["gradient_accumulation_steps"] == 2
    assert a["ds_config"]["train_batch_size"] == 16 and a["ds_config"]["gradient_clipping"] == 1.0
    assert a["eval_end"] < a["eval_start"]  # it learned
    assert a["n_tensors"] == 4  # the full state dict was gathered (ZeRO-3 included)
    # the resumed run continues exactly where the straight one went
    assert list(b["losses"]) == ["5", "6", "7", "8"]
    for step, loss in b["losses"].items():
        assert loss == pytest.approx(a["losses"][step], rel=1e-6, abs=1e-7)
    for run in (a, b):  # the LR the optimizer really used follows the schedule
        assert run["opt_lrs"] == pytest.approx(run["lrs"], rel=1e-9)
    assert b["checksum"] == pytest.approx(a["checksum"], rel=1e-6)
    assert b["eval_end"] == pytest.approx(a["eval_end"], rel=1e-6)
    assert b["probe"] == a["probe"]  # RNG streams restored
