"""scripts/diagnose_detokenizer.py's hue check (the colour part of docs/TOKENIZER_TRAINING.md, finding 11)."""
import re
import sys
from pathlib import Path

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
