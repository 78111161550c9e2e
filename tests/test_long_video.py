"""Long videos: clip-by-clip extension with known frames (divot/long_video.py), join continuity,
and DivotPipeline.generate_video(seconds=...) / divot.generate / scripts/generate.py --seconds."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import divot
from divot import long_video as lv
from divot.shapes import ShapeObject, ShapesClip, ShapesWorld, render
from divot.video_io import read_clip, to_tensor

from _llm_fixtures import make_tiny_run
from _detok_fixtures import F, SIZE, tiny_detokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def detok():
    return tiny_detokenizer()


def test_clip_arithmetic():
    assert lv.clips_needed(64, 16, 4) == 5 and lv.join_indices(5, 16, 4) == [16, 28, 40, 52]
    assert lv.clips_needed(16, 16, 4) == 1 and lv.clips_needed(8, 16, 0) == 1 and lv.clips_needed(17, 16, 0) == 2
    with pytest.raises(ValueError, match="overlap must be in"):
        lv.clips_needed(64, 16, 16)


def test_extend_video_joins_clips_on_their_overlap(detok, monkeypatch):
    k, overlap, steps = 3, 3, 2
    tokens = torch.randn(k, 4, 8, generator=torch.Generator().manual_seed(0))
    calls, real = [], detok.decode

    def spy(tok, **kw):
        out = real(tok, **kw)
        calls.append((kw.get("known_frames"), kw.get("known_method"), out[0]))
        return out

    monkeypatch.setattr(detok, "decode", spy)
    progress = []
    video = lv.extend_video(detok, list(tokens), overlap=overlap, method="guidance", seed=0, steps=steps,
                            guidance_scale=2.0, callback=lambda i, n: progress.append((i, n)))
    assert video.shape == (F + (k - 1) * (F - overlap), 3, SIZE, SIZE)
    assert calls[0][0] is None
    for j in (1, 2):
        known, method, clip = calls[j]
        prev = calls[j - 1][2]
        assert sorted(known) == list(range(overlap)) and method == "guidance"
        assert torch.equal(clip[:overlap], prev[F - overlap:])  # the new clip starts where the last one ended
    assert torch.equal(video, torch.cat([calls[0][2]] + [c[overlap:] for _, _, c in calls[1:]]))
    assert progress == [(i, k * steps) for i in range(1, k * steps + 1)]
    monkeypatch.undo()
    again = lv.extend_video(detok, tokens, overlap=overlap, method="guidance", seed=0, steps=steps, guidance_scale=2.0)
    assert torch.equal(again, video)
    other = lv.extend_video(detok, tokens, overlap=overlap, method="replacement", seed=0, steps=steps,
                            guidance_scale=2.0)
    assert torch.equal(other[:F], video[:F]) and not torch.allclose(other[F:], video[F:], atol=1e-4)


def test_extend_video_errors(detok):
    tokens = torch.zeros(2, 4, 8)
    with pytest.raises(ValueError, match="overlap must be in"):
        lv.extend_video(detok, tokens, overlap=F)
    with pytest.raises(ValueError, match=r"\(k, 4, 8\)"):
        lv.extend_video(detok, torch.zeros(2, 5, 8))
    with pytest.raises(TypeError, match="non-empty list"):
        lv.extend_video(detok, [])
    with pytest.raises(TypeError, match="sets known_frames itself"):
        lv.extend_video(detok, tokens, known_frames={0: torch.zeros(3, SIZE, SIZE)})
    with pytest.raises(ValueError, match="unknown known_method"):
        lv.extend_video(detok, tokens, method="splice")


def moving_clip(frames: int) -> torch.Tensor:
    """A red square crossing the canvas left to right over ``frames`` frames."""
    obj = ShapeObject("square", "red", "right", x=10.0, y=32.0, size=8.0, speed=44.0 / (frames - 1))
    return to_tensor(render(ShapesClip((obj,), frames), 32))


def test_join_continuity_smooth_vs_cut():
    smooth = moving_clip(48)
    joins = [16, 32]
    ok = lv.join_continuity(smooth, joins)
    assert ok["num_joins"] == 2 and ok["num_objects"] == 1
    assert 0.5 < ok["position_ratio"] < 1.5 and 0.3 < ok["pixel_ratio"] < 3
    cut = torch.cat([smooth[:16], smooth[:16], smooth[:16]])  # jumps back to the start at each join
    bad = lv.join_continuity(cut, joins)
    assert bad["position_ratio"] > 5 and bad["pixel_ratio"] > 5
    assert len(bad["position_jump_per_join"]) == 2 and all(j > 5 for j in bad["position_jump_per_join"])
    uint8 = lv.join_continuity(render(ShapesWorld(seed=0, size=32).clip("test", 0), 32), [8])
    assert uint8["num_joins"] == 1 and uint8["pixel_mse_join"] >= 0
    with pytest.raises(ValueError, match="joins must be"):
        lv.join_continuity(smooth, [48])


# ---------------------------------------------------------------- the user API
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("divot_long"))


@pytest.fixture(scope="module")
def pipe(run_dir):
    return divot.load(run_dir / "llm", device="cpu")


def test_generate_video_seconds(pipe):
    video = pipe.generate_video("a red circle moves to the left", seed=0, steps=1, seconds=3, overlap=4)
    assert video.frames.shape[0] >= 24 and video.frames.shape[1:] == (32, 32, 3) and video.fps == 8
    assert video.tokens.shape == (2, 64, 32)  # one GMM sample per clip, differing per clip
    assert not torch.equal(video.tokens[0], video.tokens[1])
    again = divot.generate("a red circle moves to the left", pipeline=pipe, seed=0, steps=1, seconds=3, overlap=4)
    assert np.array_equal(again.frames, video.frames)
    short = pipe.generate_video("a red circle", seed=0, steps=1, seconds=1)
    assert short.frames.shape[0] == 8 and short.tokens.shape == (64, 32)
    with pytest.raises(ValueError, match="seconds must be > 0"):
        pipe.generate_video("a red circle", seconds=0)
    with pytest.raises(ValueError, match="unknown known_method"):
        pipe.generate_video("a red circle", steps=1, seconds=3, known_method="splice")


def test_generate_script_seconds(run_dir, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("generate_script", ROOT / "scripts" / "generate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "long.mp4"
    assert script.main(["a red circle moves to the left", "-o", str(out), "--checkpoint", str(run_dir / "llm"),
                        "--steps", "1", "--device", "cpu", "--seconds", "3", "--known-method", "replacement"]) == 0
    assert read_clip(out, num_frames=24).shape == (24, 32, 32, 3)
    assert "24 frames" in capsys.readouterr().out
