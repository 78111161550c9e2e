"""The diagnostic scripts: diagnose_detokenizer.py (the hue check of finding 11, --partial,
--x0-probe), probe_tokens.py, diagnose_tokenizer.py and diagnose_discriminator.py."""
import copy
import re
import sys
from pathlib import Path

import pytest
import torch

from divot import presets
from divot.autoencoder import VideoAutoencoder
from divot.detokenizer import DivotDetokenizer
from divot.shapes import ShapesVideoDataset
from divot.tokenizer import DivotTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import diagnose_detokenizer  # noqa: E402


def test_hue_check_counts_single_object_clips(capsys):
    torch.manual_seed(0)
    ae = VideoAutoencoder(DivotTokenizer(presets.tokenizer_config("tiny")),
                          DivotDetokenizer(presets.detokenizer_config("tiny"))).eval()
    ds = ShapesVideoDataset("val", size=32)
    diagnose_detokenizer.hue_check(ae, ds, clips=3, seed=0)
    lines = capsys.readouterr().out.splitlines()
    counts = [re.search(r"t= *(\d+): right in (\d+) of (\d+)", line).groups() for line in lines]
    assert [t for t, _, _ in counts] == ["999", "500"]
    assert all(int(n) == 3 and 0 <= int(k) <= 3 for _, k, n in counts)


def test_partial_sampling_keeps_what_the_input_still_shows(capsys):
    """From a barely noised clip even a fresh de-tokenizer ends on the clip: the probe agrees."""
    torch.manual_seed(0)
    ae = VideoAutoencoder(DivotTokenizer(presets.tokenizer_config("tiny")),
                          DivotDetokenizer(presets.detokenizer_config("tiny"))).eval()
    ds = ShapesVideoDataset("test", size=32)
    diagnose_detokenizer.partial_sampling(ae, ds, clips=2, guidance=2.0, seed=0, starts=(999, 40))
    lines = capsys.readouterr().out.splitlines()
    rows = [re.search(r"t= *(\d+): probe agreement ([\d.]+) \(colour ([\d.]+), shape ([\d.]+)", line).groups()
            for line in lines]
    assert len(rows) == 2 and int(rows[0][0]) > 900 and int(rows[1][0]) <= 40
    assert float(rows[1][1]) == 1.0  # the input alone still carries every attribute


def test_x0_probe_reads_barely_noised_and_lightly_blurred_clips(capsys):
    torch.manual_seed(0)
    ae = VideoAutoencoder(DivotTokenizer(presets.tokenizer_config("tiny")),
                          DivotDetokenizer(presets.detokenizer_config("tiny"))).eval()
    ds = ShapesVideoDataset("test", size=32)
    diagnose_detokenizer.x0_probe(ae, ds, clips=3, seed=0, levels=(999, 2), sigmas=(0.3, 3.0))
    lines = capsys.readouterr().out.splitlines()
    agree = [float(re.search(r"probe agreement ([\d.]+)", line).group(1)) for line in lines]
    assert len(lines) == 4 and "t= 999" in lines[0] and "sigma 3.0" in lines[3]
    assert agree[1] == 1.0 and agree[2] == 1.0  # x̂0 at t = 2 and a 0.3 px blur are the clip
    assert agree[0] < 1.0 and agree[3] < 1.0  # pure noise through random weights; a 3 px blur


def test_probe_tokens_reads_colour_from_a_fresh_tokenizer(capsys):
    import probe_tokens

    report = probe_tokens.main(["--fresh", "--clips", "160", "--test", "60", "--steps", "30",
                                "--stage", "resampler", "--stage", "tokens"])
    assert set(report) >= {"resampler", "tokens"} and "vit" not in report
    for stage in ("resampler", "tokens"):
        assert set(report[stage]) == {"color", "shape", "direction"}
        assert report[stage]["color"]["set"] > 0.5  # chance 1/6: colour survives a random tokenizer
        assert set(report[stage]["color"]) == set(probe_tokens.READOUTS)
    assert json_line(capsys.readouterr().out) == report


def test_mixed_readout_reads_what_lies_between_positions():
    import probe_tokens

    # The label is which of two positions holds more of feature 0: the mean over positions
    # cannot tell, one learned combination of positions can (as with motion across tokens).
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1200, 6, 4, generator=gen)
    y = (x[:, 1, 0] > x[:, 4, 0]).long()
    acc = {k: probe_tokens.fit_readout(x, y, 300, k, 16, 300, 0) for k in ("pooled", "mixed")}
    assert acc["mixed"] > 0.9 and acc["pooled"] < 0.7


def json_line(out: str) -> dict:
    import json

    return json.loads(out.strip().splitlines()[-1])


def test_decode_from_a_noised_clip_errors():
    torch.manual_seed(0)
    det = DivotDetokenizer(presets.detokenizer_config("tiny")).eval()
    tokens, video = torch.zeros(1, 64, 32), torch.zeros(1, 16, 3, 32, 32)
    with pytest.raises(ValueError, match="init_video needs init_t"):
        det.decode(tokens, steps=2, init_video=video)
    with pytest.raises(ValueError, match="below every sampler timestep"):
        det.decode(tokens, steps=2, init_video=video, init_t=-1)
    with pytest.raises(ValueError, match="variance-preserving"):
        det.decode(tokens, steps=2, init_video=video, init_t=500, sampler="euler")


def test_discriminator_separability_is_zero_for_the_same_clips_and_positive_otherwise():
    import diagnose_discriminator

    torch.manual_seed(0)
    det = DivotDetokenizer(presets.detokenizer_config("tiny")).eval()
    with torch.no_grad():  # a fresh U-Net's zero-initialised output would make every fake the same
        det.unet.conv_out.weight.normal_(std=0.05)
    tokenizer = DivotTokenizer(presets.tokenizer_config("tiny")).eval()
    disc = diagnose_discriminator.Discriminator(copy.deepcopy(det)).eval()
    video = torch.stack([ShapesVideoDataset("test", size=32)[i]["video"] for i in range(2)])
    result = diagnose_discriminator.measure(disc, det, tokenizer, video, [20, 500])
    assert set(result) == {20, 500} and all(len(row) == len(det.unet.cfg.block_out_channels) + 2
                                            for row in result.values())
    assert all(v > 0 for row in result.values() for v in row)
    feats = torch.randn(6, 4, 3, 3)
    assert diagnose_discriminator.separability(feats, feats) == 0.0
    assert diagnose_discriminator.separability(feats, torch.zeros_like(feats)) > 0.5
