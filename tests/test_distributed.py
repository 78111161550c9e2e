"""2-process CPU runs of the training scripts under DeepSpeed ZeRO-3 (issue 6: scale), and of
the distillation script under ZeRO-2 and ZeRO-3.

Each test launches a real training script with ``accelerate launch`` and the settings of
``training/configs/accelerate_cpu_zero3.yaml`` (parameters, gradients and optimizer states
sharded over 2 gloo processes), runs 2 optimizer steps, and then loads the exported model
directories in *this* process, without DeepSpeed, and runs a forward: what a user does with
a checkpoint trained on a cluster. The ZeRO-2 runs live beside each script's own tests
(tests/test_train_tokenizer.py, tests/test_train_llm.py).

Cost: process start-up (torch, DeepSpeed, transformers imports in 2 processes) is a large
part of each test's time, so the runs are as short as the scripts allow (1–2 steps, smallest
batches). The shipped CPU ZeRO-3 config sets ``stage3_max_reuse_distance: 0`` (see its
comment): with DeepSpeed's default the tiny tokenizer's 2 steps took minutes on 2 cores.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from divot.tokenizer import DivotTokenizer
from _launch import free_port, subprocess_env

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]


def _launch_run(script: str, tmp_path: Path, *args: str, timeout: int = 600, stage: int = 3) -> Path:
    """``accelerate launch`` ``script`` on 2 CPU processes under ZeRO-3 (or the shipped ZeRO-2
    CPU config with ``stage=2``); returns its run directory."""
    run = tmp_path / "run"
    config = REPO / "training" / "configs" / f"accelerate_cpu_zero{stage}.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--num_processes", "2", "--main_process_port", str(free_port()), str(REPO / "training" / script),
           "--output-dir", str(run), *args]
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(OMP_NUM_THREADS="1", DIVOT_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    print(f"{script} under ZeRO-{stage}, 2 processes: {time.time() - start:.1f} s")
    assert_zero3_run(run, stage)
    return run


def assert_zero3_run(run: Path, stage: int = 3) -> None:
    runtime = yaml.safe_load((run / "runtime.yaml").read_text())
    assert runtime["num_processes"] == 2 and "DEEPSPEED" in runtime["distributed_type"].upper()
    assert runtime["deepspeed_config"]["zero_optimization"]["stage"] == stage


@pytest.mark.slow
def test_tokenizer_zero3_two_process_run_loads_without_deepspeed(tmp_path):
    pytest.importorskip("deepspeed")
    # One step per stage: stage 2 (tokenizer frozen, run without grad) is sharded too.
    run = _launch_run("pretrain_tokenizer.py", tmp_path, "batch_size=1", "stage1.steps=1", "stage2.steps=1",
                        "stage1.warmup_steps=1", "stage2.warmup_steps=1", "stage1.tokenizer_delay_steps=0",
                        "log_every=1", "sample_every=100", "sample_clips=1", "sample_steps=1")
    assert (run / "checkpoints" / "step_00000002" / "trainer_state.json").is_file()

    from divot.autoencoder import VideoAutoencoder
    ae = VideoAutoencoder.from_pretrained(run)  # strict: a missing, renamed or empty tensor fails here
    # Zero-initialised outputs only move if the trained (gathered) weights were exported.
    assert ae.detokenizer.unet.conv_out.weight.abs().sum() > 0
    torch.manual_seed(0)
    clip = torch.rand(1, 16, 3, 32, 32) * 2 - 1
    tokens = ae.encode(clip)
    video = ae.decode(tokens, steps=2, guidance_scale=2.0)
    assert tokens.shape == (1, 64, 32) and torch.isfinite(tokens).all()
    assert video.shape == (1, 16, 3, 32, 32) and torch.isfinite(video).all()


@pytest.mark.slow
def test_llm_zero3_two_process_run_loads_without_deepspeed(tmp_path, tokenizer_dir):
    pytest.importorskip("deepspeed")
    run = _launch_run("train_llm.py", tmp_path, f"tokenizer_dir={tokenizer_dir}", "--stage", "pretrain",
                        "steps=2", "warmup_steps=1", "batch_size=1", "log_every=1", "data.feature_batch_size=8")
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2

    from llm import lora
    from llm.model import DivotLLM
    final = DivotLLM.from_pretrained(run / "final")  # every weight restored, strictly
    # LoRA B starts at 0: a non-zero B proves the trained weights were gathered and written.
    b_norm = sum(p.abs().sum() for n, p in lora.lora_parameters(final.lm).items() if "lora_B" in n)
    assert b_norm > 0
    merged = DivotLLM.from_pretrained(run / "merged")
    ids = torch.tensor([[final.special_ids["bos"], 1000, 2000, 3000]])
    with final.inference(), merged.inference():
        a = final(ids).logits
        b = merged(ids).logits
    assert a.shape == (1, 4, len(final.text_tokenizer)) and torch.isfinite(a).all()
    # The merged checkpoint (LoRA folded into the base) computes the same function.
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    tokens = merged.generate_video_tokens(ids, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (64, 32) and torch.isfinite(tokens).all()


@pytest.mark.slow
def test_distillation_two_process_run_loads_without_deepspeed(tmp_path, tokenizer_dir):
    # ZeRO-3 only: ZeRO-2 is covered by the tokenizer and LLM runs (test_train_*), and the two
    # parameter groups of distillation are the harder case when ZeRO-3 partitions them.
    pytest.importorskip("deepspeed")
    from divot.detokenizer import DivotDetokenizer
    from divot.presets import detokenizer_config
    torch.manual_seed(0)
    DivotDetokenizer(detokenizer_config("tiny")).save_pretrained(tmp_path / "teacher")
    # One discriminator and one generator update, each a phase of its own (ZeRO sees both groups).
    run = _launch_run("distill_detokenizer.py", tmp_path, f"teacher_dir={tmp_path / 'teacher'}",
                        f"tokenizer_dir={tokenizer_dir}", "batch_size=1", "log_every=1", "warmup_steps=1",
                        "--max-steps", "1", stage=3)
    student = DivotDetokenizer.from_pretrained(run / "detokenizer")
    teacher = DivotDetokenizer.from_pretrained(tmp_path / "teacher")
    assert student.config.one_step
    assert any(not torch.equal(v, teacher.state_dict()[k]) for k, v in student.state_dict().items())
    video = student.decode(DivotTokenizer.from_pretrained(tokenizer_dir)(torch.zeros(1, 16, 3, 32, 32)))
    assert video.shape == (1, 16, 3, 32, 32) and torch.isfinite(video).all()


def test_gathered_state_dict_gets_every_alias_and_only_the_module_keys():
    """What DeepSpeed's ZeRO-3 gather returns (each shared tensor under one name, plus tensors a
    module's own state_dict leaves out) is mapped to ``module.state_dict()``'s names."""
    from diffusers.models.resnet import Downsample2D

    from training.runtime import _match_module_names

    module = torch.nn.Sequential(Downsample2D(4, use_conv=True, out_channels=4))
    full = module.state_dict()
    assert {"0.conv.weight", "0.Conv2d_0.weight"} <= set(full)  # one conv, two names
    gathered = {n: p.detach().clone() for n, p in module.named_parameters()}  # duplicates dropped
    gathered["0.external.weight"] = torch.zeros(1)  # e.g. the de-tokenizer's VAE
    assert set(gathered) != set(full)
    matched = _match_module_names(module, gathered)
    assert list(matched) == list(full)
    for name, tensor in full.items():
        assert torch.equal(matched[name], tensor), name
