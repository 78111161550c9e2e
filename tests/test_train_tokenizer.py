"""training/pretrain_tokenizer.py end to end: config errors, kill + resume = uninterrupted run, DeepSpeed."""
from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from divot.modeling import CheckpointError
from training.tokenizer_setup import StepSampler, TokenizerTrainConfig, check_resumable, stage_lambdas

from _launch import free_port, subprocess_env

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "training" / "pretrain_tokenizer.py"
# Small and fast, but crossing the stage 1 → stage 2 boundary (step 3) before step 4.
FAST = ["batch_size=2", "stage1.steps=3", "stage2.steps=3", "stage1.warmup_steps=1", "stage2.warmup_steps=1",
        "save_every=2", "log_every=1", "sample_every=100", "sample_clips=1", "sample_steps=2"]


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _weights(run: Path) -> dict[str, torch.Tensor]:
    out = {}
    for part in ("tokenizer", "detokenizer"):
        out.update({f"{part}.{k}": v for k, v in load_file(str(run / part / "model.safetensors")).items()})
    return out


def test_unknown_config_key_is_an_error(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--output-dir", str(tmp_path), "stage1.lrr=1"],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "unknown config key" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_schedule_freezes_tokenizer_in_stage2_and_sampler_is_positional():
    default = TokenizerTrainConfig(preset="tiny")  # tiny: end to end, the tokenizer at 3 % of the rate
    tok_lr, det_lr = stage_lambdas(default)
    s1 = default.stage1.steps
    assert all(tok_lr(step) == pytest.approx(0.03 * det_lr(step)) for step in (0, 49, 300, s1 - 1))
    assert tok_lr(s1) == 0 and tok_lr(s1 + 100) == 0 and det_lr(s1) > 0
    cfg = dataclasses.replace(default, stage1=dataclasses.replace(default.stage1, tokenizer_delay_steps=300,
                                                                  tokenizer_lr_scale=1.0))
    tok_lr, det_lr = stage_lambdas(cfg)
    assert tok_lr(299) == 0 and tok_lr(300) > 0 and tok_lr(s1 - 1) > 0 and tok_lr(s1) == 0
    assert tok_lr(300) == pytest.approx(1 / cfg.stage1.warmup_steps)  # the delayed warm-up starts over
    full = StepSampler(100, 4, rank=1, world=2, seed=0, start_step=0)
    later = StepSampler(100, 4, rank=1, world=2, seed=0, start_step=5)
    it_full, it_later = iter(full), iter(later)
    head = [next(it_full) for _ in range(4 * 8)]
    assert head[4 * 5: 4 * 6] == [next(it_later) for _ in range(4)]


def test_resume_of_a_first_layout_checkpoint_names_the_way_on(tmp_path):
    from safetensors.torch import save_file
    old, new = tmp_path / "old", tmp_path / "new"
    for d, key in ((old, "net.0.weight"), (new, "pixel_in.weight")):
        d.mkdir()
        save_file({f"detokenizer.pixel_head.{key}": torch.zeros(1)}, str(d / "model.safetensors"))
    check_resumable(new)
    check_resumable(tmp_path)  # no model.safetensors (a DeepSpeed checkpoint): nothing to check
    with pytest.raises(CheckpointError, match=f"init_from={old}"):
        check_resumable(old)


@pytest.mark.slow
def test_killed_run_resumes_to_identical_weights(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _run(["--output-dir", str(straight), "--max-steps", "4", *FAST])
    # Same run with room for 6 steps, killed (SIGKILL) once its step-2 checkpoint exists.
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--output-dir", str(killed), "--max-steps", "6", *FAST],
                            cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "step_00000002" / "trainer_state.json").exists():
        assert proc.poll() is None, "training exited before it could be interrupted"
        assert time.time() < deadline, "no checkpoint within 240 s"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "tokenizer").exists()
    out = _run(["--output-dir", str(killed), "--max-steps", "4", "--resume", *FAST])
    assert "resumed from" in out.stderr + out.stdout
    a, b = _weights(straight), _weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    assert (straight / "tb").is_dir() and list((straight / "samples").glob("*.mp4"))


@pytest.mark.slow
def test_two_process_deepspeed_zero2(tmp_path):
    pytest.importorskip("deepspeed")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "training/configs/accelerate_cpu_zero2.yaml"), "--num_processes", "2",
           "--main_process_port", str(free_port()), str(SCRIPT), "--output-dir", str(tmp_path),
           "--max-steps", "4", *FAST]
    env = subprocess_env(OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "DEEPSPEED" in (tmp_path / "runtime.yaml").read_text().upper()
    from divot.autoencoder import VideoAutoencoder
    ae = VideoAutoencoder.from_pretrained(tmp_path)
    assert ae.encode(torch.zeros(1, 16, 3, 32, 32)).shape == (1, 64, 32)
