"""Writing clips: h264 mp4 (and webm/mkv/avi/mov) through PyAV, looping GIF through PIL.

Files are written to a temporary name in the target folder and renamed into place,
so an interrupted write never leaves a half-written video under the final name.

Axis glossary: f = frames, h = height, w = width, c = channels (RGB).
Arrays are uint8 (f, h, w, c); tensors are float (f, c, h, w) in [-1, 1].
"""
from __future__ import annotations

import math
import os
import tempfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image

from divot.video_io import CLIP_FPS, to_uint8

# extension -> (container format, codec, encoder options) for write_video;
# .gif goes through PIL (adaptive palette). Settings aim at near-lossless
# previews: x264 crf 17, vp9 constant quality (fast realtime mode), mpeg4 q2.
_WRITERS = {
    ".mp4": ("mp4", "libx264", {"crf": "17", "preset": "medium"}),
    ".mov": ("mov", "libx264", {"crf": "17", "preset": "medium"}),
    ".mkv": ("matroska", "libx264", {"crf": "17", "preset": "medium"}),
    ".webm": ("webm", "libvpx-vp9", {"crf": "24", "b:v": "0", "deadline": "realtime", "cpu-used": "8"}),
    ".avi": ("avi", "mpeg4", {"qscale": "2"}),
}


def side_by_side(*videos: np.ndarray | torch.Tensor, gap: int = 2, gap_value: int = 255) -> np.ndarray:
    """Concatenate videos (same f) horizontally with a ``gap``-pixel divider.

    Inputs are uint8 (f, h, w, 3) or float (f, 3, h, w) in [-1, 1]; shorter
    ones are padded with black at the bottom so heights match.
    """
    if not videos:
        raise ValueError("side_by_side needs at least one video")
    arrays = [to_uint8(v) for v in videos]
    f = arrays[0].shape[0]
    if any(a.shape[0] != f for a in arrays):
        raise ValueError(f"frame counts differ: {[a.shape[0] for a in arrays]}")
    h = max(a.shape[1] for a in arrays)
    parts = []
    for i, a in enumerate(arrays):
        if i:
            parts.append(np.full((f, h, gap, 3), gap_value, np.uint8))
        parts.append(np.pad(a, ((0, 0), (0, h - a.shape[1]), (0, 0), (0, 0))))
    return np.concatenate(parts, axis=2)


# ------------------------------------------------------------------- writing
def write_video(path: str | os.PathLike, frames: np.ndarray | torch.Tensor, fps: float = CLIP_FPS) -> Path:
    """Write uint8 (f, h, w, 3) or float (f, 3, h, w) in [-1, 1] frames.

    .mp4/.mov/.mkv: h264 yuv420p (odd sides padded by edge replication to
    even, as 4:2:0 needs); .webm: vp9; .avi: mpeg4; .gif: looping GIF. The
    file appears atomically (temp file in the same folder, then rename).
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext != ".gif" and ext not in _WRITERS:
        raise ValueError(f"cannot write '{path}': extension must be one of {sorted([*_WRITERS, '.gif'])}")
    arr = to_uint8(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3 or len(arr) == 0:
        raise ValueError(f"expected frames (f, h, w, 3) with f >= 1, got {arr.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=ext, dir=path.parent)
    os.close(fd)
    try:
        if ext == ".gif":
            _write_gif(tmp, arr, fps)
        else:
            _write_av(tmp, arr, fps, *_WRITERS[ext])
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _write_av(path: str, arr: np.ndarray, fps: float, fmt: str, codec: str, options: dict[str, str]) -> None:
    h, w = arr.shape[1:3]
    arr = np.pad(arr, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    with av.open(path, mode="w", format=fmt) as out:
        stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = arr.shape[2], arr.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = dict(options)
        for img in arr:
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def _write_gif(path: str, arr: np.ndarray, fps: float) -> None:
    # GIF delays are whole centiseconds. Frame k starts at floor(100 k / fps)
    # cs, never after its true time, so reading back at `fps` finds frame k.
    starts = [math.floor(100 * k / fps) for k in range(len(arr) + 1)]
    delays_ms = [10 * max(1, b - a) for a, b in zip(starts, starts[1:])]
    images = [Image.fromarray(img) for img in arr]
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=delays_ms, loop=0)
