"""Temporal-only de-tokenizer fine-tuning (divot/finetune.py; training options `init_from`,
`detokenizer_trainable`; scripts/temporal_finetune_report.py's fine-tuning command).

A tiny run is trained for one step with training/pretrain_tokenizer.py's ``main`` (in process),
then fine-tuned from it with ``init_from=... detokenizer_trainable=temporal``: one step, a run
that ends, then ``--resume`` for a second step (crossing into stage 2). Only temporal U-Net
parameters may move; the tokenizer is trainable in stage 1 of these settings unless frozen.
"""
from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from divot import config as cfglib
from divot import presets
from divot.detokenizer import DivotDetokenizer
from divot.finetune import check_trainable, freeze_all_but_temporal, temporal_parameter_names
from divot.modeling import CheckpointError
from divot.unet import VideoUNet
from training import pretrain_tokenizer
from training.tokenizer_setup import (TokenizerTrainConfig, build_model, check_init_from, expand_presets,
                                      init_model_overrides)

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]

FAST = ["batch_size=1", "stage1.steps=1", "stage2.steps=2", "stage1.warmup_steps=1", "stage2.warmup_steps=1",
        "stage1.tokenizer_delay_steps=0",  # an unfrozen tokenizer would move in step 1
        "log_every=1", "sample_every=100", "sample_clips=1", "sample_steps=1", "save_every=100"]
TEMPORAL_NAME = re.compile(r"(^|\.)(temp_conv|temp_attn)\.|^frame_embedding$")


def _weights(run: Path) -> dict[str, torch.Tensor]:
    out = {}
    for part in ("tokenizer", "detokenizer"):
        out.update({f"{part}.{k}": v for k, v in load_file(str(run / part / "model.safetensors")).items()})
    return out


def _train(argv: list[str]) -> None:
    """The training entry point in process; accelerate's singleton state and the root logger
    (``setup_logging`` replaces its handlers) are left as they were found."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("DIVOT_NUM_THREADS", "1")  # the trainer would otherwise take every core
            mp.setenv("CUDA_VISIBLE_DEVICES", "")
            pretrain_tokenizer.main(argv)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        root.handlers[:], root.level = handlers, level


def _cfg(**data) -> TokenizerTrainConfig:
    return cfglib.from_dict(TokenizerTrainConfig, expand_presets(data))


@pytest.fixture(scope="module")
def init_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("init")
    # No weight average: the export then equals the last checkpoint's weights (compared below).
    _train(["--output-dir", str(run), "--max-steps", "1", "ema_decay=0", *FAST])
    return run


@pytest.fixture(scope="module")
def tuned_run(init_run, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("tuned")
    args = ["--output-dir", str(run), f"init_from={init_run}", "detokenizer_trainable=temporal", *FAST]
    _train([*args, "--max-steps", "1"])
    _train([*args, "--max-steps", "2", "--resume"])  # continues from the step-1 checkpoint
    return run


def test_selection_is_exactly_the_temporal_layers():
    cfg = presets.detokenizer_config("tiny")
    unet = VideoUNet(cfg.unet, context_grid=cfg.context_grid)
    names = temporal_parameter_names(unet)
    all_names = [n for n, _ in unet.named_parameters()]
    assert names == [n for n in all_names if TEMPORAL_NAME.search(n)]
    assert "frame_embedding" in names and any(n.endswith("temp_attn.pos") for n in names)
    assert any(".temp_conv.conv.weight" in n for n in names)
    assert not any(k in n for n in names for k in (".resnet.", ".attn.", "conv_in", "conv_out", "time_embedding"))
    # Every TemporalTransformer's frame positions, and nothing outside the three kinds.
    assert sum(n.endswith(".pos") for n in names) == sum(n.endswith(".pos") for n in all_names) > 0


def test_freeze_counts_and_flags():
    det = DivotDetokenizer(presets.detokenizer_config("tiny"))
    trainable, total = freeze_all_but_temporal(det)
    flags = {n: p.requires_grad for n, p in det.named_parameters()}
    expected = {f"unet.{n}" for n in temporal_parameter_names(det.unet)}
    assert {n for n, on in flags.items() if on} == expected
    assert trainable == sum(p.numel() for n, p in det.named_parameters() if n in expected)
    assert total == sum(p.numel() for p in det.parameters()) and 0 < trainable < total


def test_bad_option_values_raise(init_run, tmp_path):
    with pytest.raises(cfglib.ConfigError, match="detokenizer_trainable"):
        _cfg(detokenizer_trainable="spatial")
    with pytest.raises(ValueError, match="detokenizer_trainable must be one of"):
        check_trainable("Temporal")
    with pytest.raises(ValueError, match="detokenizer_trainable"):
        build_model(TokenizerTrainConfig(detokenizer_trainable="everything"))
    with pytest.raises(SystemExit, match="config error.*detokenizer_trainable"):
        _train(["--output-dir", str(tmp_path / "bad"), "detokenizer_trainable=spatial"])
    with pytest.raises(CheckpointError, match="no such directory"):
        check_init_from(_cfg(init_from=str(tmp_path / "missing")))
    with pytest.raises(CheckpointError, match="neither a run directory"):
        check_init_from(_cfg(init_from=str(tmp_path)))
    with pytest.raises(cfglib.ConfigError, match=r"detokenizer\.unet\.ff_mult: init 2, this run 4"):
        check_init_from(_cfg(init_from=str(init_run), detokenizer={"unet": {"ff_mult": 4}}))
    assert not (tmp_path / "bad").exists()


def test_init_from_checkpoint_equals_init_from_run_dir(init_run):
    from_dir = build_model(_cfg(init_from=str(init_run))).state_dict()
    from_ckpt = build_model(_cfg(init_from=str(init_run / "checkpoints" / "step_00000001"))).state_dict()
    assert from_dir.keys() == from_ckpt.keys()
    assert all(torch.equal(from_dir[k], from_ckpt[k]) for k in from_dir)


def test_temporal_finetune_moves_only_temporal_parameters(init_run, tuned_run):
    before, after = _weights(init_run), _weights(tuned_run)
    assert before.keys() == after.keys()
    cfg = presets.detokenizer_config("tiny")
    unet = VideoUNet(cfg.unet, context_grid=cfg.context_grid)
    temporal = {f"detokenizer.unet.{n}" for n in temporal_parameter_names(unet)}
    params = {f"detokenizer.{n}" for n, _ in DivotDetokenizer(presets.detokenizer_config("tiny")).named_parameters()}
    params |= {k for k in before if k.startswith("tokenizer.")}
    frozen_changed = [k for k in sorted(params - temporal) if not torch.equal(before[k], after[k])]
    assert frozen_changed == []
    moved = [k for k in sorted(temporal) if not torch.equal(before[k], after[k])]
    assert len(moved) > 0
    assert cfglib.load_yaml(tuned_run / "config.yaml")["detokenizer_trainable"] == "temporal"


def test_optimizer_holds_only_temporal_parameters_and_resumed(tuned_run):
    opt = torch.load(tuned_run / "checkpoints" / "step_00000002" / "optimizer.bin", weights_only=True)
    cfg = presets.detokenizer_config("tiny")
    unet = VideoUNet(cfg.unet, context_grid=cfg.context_grid)
    assert len(opt["param_groups"]) == 1  # the frozen tokenizer's group is left out
    assert len(opt["param_groups"][0]["params"]) == len(temporal_parameter_names(unet))
    steps = {float(s["step"]) for s in opt["state"].values()}
    assert steps == {2.0}  # AdamW state carried over the resume: 1 step + 1 step


def test_init_model_overrides_make_configs_match(init_run):
    changed = {"detokenizer": {"unet": {"ff_mult": 4}}}  # as if the preset had changed since the run
    with pytest.raises(cfglib.ConfigError):
        check_init_from(_cfg(init_from=str(init_run), **changed))
    check_init_from(_cfg(init_from=str(init_run), **cfglib.merge(changed, init_model_overrides(init_run))))


def test_report_script_fine_tuning_command_resolves(init_run, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("tft_report", REPO / "scripts" / "temporal_finetune_report.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = script.parse_args([str(init_run), "--output-dir", str(tmp_path), "--steps", "7", "--lr", "1e-4"])
    cmd = script.finetune_command(args, init_run, tmp_path / "finetune")
    pretrain_tokenizer.main([*cmd[2:], "--print-config"])  # resolves, and init_from's configs match
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["init_from"] == str(init_run) and printed["detokenizer_trainable"] == "temporal"
    assert (printed["stage1"]["steps"], printed["stage2"]["steps"], printed["stage2"]["lr"]) == (0, 7, 1e-4)
    with pytest.raises(SystemExit):
        script.parse_args([str(init_run), "--output-dir", str(tmp_path), "--steps", "0"])
