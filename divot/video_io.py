"""Video files in and out: PyAV decoding into fixed-rate clips, encoding previews.

Divot sees video as 2-second windows of 16 frames sampled at 8 fps (DESIGN §2).
This module turns anything FFmpeg can demux (mp4, webm, mkv, avi, mov, gif)
into such windows while streaming: it decodes forward and keeps only the frames
it needs, so a long or high-resolution video never sits in memory whole. It
writes clips back out through ``divot.video_write`` (re-exported here).

Axis glossary: n = clips, f = frames, h = height, w = width, c = channels (RGB).
Arrays are uint8 (f, h, w, c); tensors are float (f, c, h, w) in [-1, 1].
"""
from __future__ import annotations

import itertools
import logging
import math
import os
from contextlib import closing, contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator

import av
import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

CLIP_FRAMES = 16
CLIP_FPS = 8.0
TOKENIZER_FRAME_INDICES = (0, 4, 8, 12, 15)
MAX_QA_CLIPS = 20
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".gif")

# Frame times come from integer timestamps in odd time bases; a frame within
# this many seconds of a target time counts as being "at" it.
_TIME_EPS = 1e-3
# Used only when a stream states no frame rate at all (some avi/gif files).
_DEFAULT_FPS = 25.0
# Errors FFmpeg/PyAV raise on unreadable input. PyAV's FileNotFoundError,
# InvalidDataError etc. subclass FFmpegError and OSError/ValueError.
_AV_ERRORS = (av.error.FFmpegError, OSError, ValueError, EOFError, IndexError)


class VideoReadError(RuntimeError):
    """A video could not be read; ``.path`` names the file, the message too."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"cannot read video '{self.path}': {reason}")


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about a video's first video stream."""

    path: str
    width: int
    height: int
    fps: float
    duration: float  # seconds
    num_frames: int  # from metadata when present, else duration * fps


# --------------------------------------------------------------------- decoding
@contextmanager
def _open_video(path: str | os.PathLike) -> Iterator[tuple[av.container.InputContainer, av.VideoStream]]:
    """Open ``path`` and yield (container, first video stream); always closes."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise VideoReadError(path, "no such file")
    if os.path.getsize(path) == 0:
        raise VideoReadError(path, "file is empty")
    try:
        container = av.open(path, mode="r")
    except _AV_ERRORS as exc:
        raise VideoReadError(path, f"not a readable video ({exc})") from exc
    try:
        if not container.streams.video:
            raise VideoReadError(path, "no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame/slice threads: several x faster on HD
        yield container, stream
    finally:
        container.close()


def _nominal_fps(stream: av.VideoStream) -> float | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and float(rate) > 0:
            return float(rate)
    return None


def _origin(stream: av.VideoStream) -> float:
    """Time (s) that counts as t = 0: the stream's declared start, if any."""
    if stream.start_time is not None and stream.time_base is not None:
        return float(stream.start_time * stream.time_base)
    return 0.0


def _timed_frames(path: str, container, stream, strict: bool) -> Iterator[tuple[float, av.VideoFrame]]:
    """Decoded frames with their time (s) relative to the stream origin.

    Frames without timestamps (broken avi muxers) get index / nominal fps. A
    decode error mid-stream ends the stream (the frames so far are kept: a
    damaged tail should not lose a whole clip). ``strict`` raises when fewer
    than two frames decode, which is what "not a video" means here.
    """
    origin, fps = _origin(stream), _nominal_fps(stream) or _DEFAULT_FPS
    count = 0
    error: Exception | None = None
    try:
        for frame in container.decode(stream):
            t = frame.time
            yield (t - origin if t is not None else count / fps), frame
            count += 1
    except _AV_ERRORS as exc:
        error = exc
        if count >= 2:
            logger.warning("%s: decoding stopped after %d frames (%s)", path, count, exc)
    if strict and count < 2:
        reason = "no decodable frames" if count == 0 else "only one decodable frame"
        raise VideoReadError(path, reason + (f" ({error})" if error else "")) from error


def _frames_from(path: str, start: float) -> Iterator[tuple[float, av.VideoFrame]]:
    """Timed frames beginning at or before ``start`` seconds.

    Seeks to the keyframe before ``start`` when start > 0. Some demuxers seek
    badly (land after the target, or nowhere); then, and for videos too short
    to tell, this falls back to decoding from the beginning.
    """
    if start > 0:
        with _open_video(path) as (container, stream), closing(
            _timed_frames(path, container, stream, strict=False)
        ) as frames:
            head: list[tuple[float, av.VideoFrame]] = []
            if stream.time_base:
                try:
                    offset = int((start + _origin(stream)) / stream.time_base)
                    container.seek(offset, stream=stream, backward=True, any_frame=False)
                    head = list(itertools.islice(frames, 2))
                except _AV_ERRORS as exc:
                    logger.debug("%s: seek to %.3fs failed (%s)", path, start, exc)
            if len(head) == 2 and head[0][0] <= start + _TIME_EPS:
                yield from head
                yield from frames
                return
        logger.debug("%s: seek to %.3fs unusable, decoding from the start", path, start)
    with _open_video(path) as (container, stream):
        yield from _timed_frames(path, container, stream, strict=True)


def _frame_rgb(frame: av.VideoFrame, size: int | None) -> np.ndarray:
    """Any pixel format (yuv, gray, pal8, bgra...) -> uint8 (h, w, 3) RGB."""
    rgb = frame.to_ndarray(format="rgb24")
    return rgb if size is None else resize_center_crop(rgb[None], size)[0]


def _sample_windows(
    frames: Iterable[tuple[float, av.VideoFrame]],
    window_starts: Iterable[float],
    num_frames: int,
    fps: float,
    size: int | None,
) -> Iterator[np.ndarray]:
    """Yield one (f, h, w, 3) clip per window start (increasing, seconds).

    Target i of a window is start + i / fps; it takes the last frame at or
    before that time, so it is settled as soon as a later frame arrives. Only
    the current candidate frame is kept (converted to RGB at most once). At
    the end of the stream the window in progress is padded with the last
    frame; windows that begin after the last frame are dropped, except that
    at least one window is always produced.
    """
    starts = iter(window_starts)
    w_start = next(starts, None)
    out: list[np.ndarray] = []
    produced = 0
    prev: list = []  # [time, frame, rgb-or-None] of the current candidate

    def candidate(fallback: av.VideoFrame) -> np.ndarray:
        if not prev:  # video begins after the target: nothing earlier to use
            return _frame_rgb(fallback, size)
        if prev[2] is None:
            prev[2] = _frame_rgb(prev[1], size)
        return prev[2]

    for t, frame in frames:
        while w_start is not None and t > w_start + len(out) / fps + _TIME_EPS:
            out.append(candidate(frame))
            if len(out) == num_frames:
                yield np.stack(out)
                out, produced, w_start = [], produced + 1, next(starts, None)
        if w_start is None:
            return
        prev[:] = [t, frame, None]
    if not prev:
        return
    while w_start is not None and (out or w_start <= prev[0] + _TIME_EPS or produced == 0):
        last = candidate(prev[1])
        yield np.stack(out + [last] * (num_frames - len(out)))
        out, produced, w_start = [], produced + 1, next(starts, None)


def _check_sampling(num_frames: int, fps: float, start: float = 0.0, max_clips: int | None = None) -> None:
    bad_clips = max_clips is not None and max_clips < 1
    if num_frames < 1 or fps <= 0 or start < 0 or not math.isfinite(start) or bad_clips:
        raise ValueError(
            f"need num_frames >= 1, fps > 0, start >= 0, max_clips >= 1; "
            f"got {num_frames}, {fps}, {start}, {max_clips}"
        )


# ------------------------------------------------------------------ public read
def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Size, rate and length of a video; decodes two frames to prove it reads."""
    path = os.fspath(path)
    with _open_video(path) as (container, stream):
        fps = _nominal_fps(stream)
        tb = stream.time_base
        duration = float(stream.duration * tb) if stream.duration and tb else None
        if duration is None and container.duration:
            duration = container.duration / av.time_base
        head = list(itertools.islice(_timed_frames(path, container, stream, strict=True), 2))
        if fps is None:
            gap = head[1][0] - head[0][0]
            fps = 1.0 / gap if gap > 0 else _DEFAULT_FPS
        if duration is None:  # no metadata: the end of the last packet
            end = head[1][0] + 1.0 / fps
            for packet in container.demux(stream):
                if packet.pts is not None:
                    end = max(end, float((packet.pts + (packet.duration or 0)) * tb) - _origin(stream))
            duration = end
        width = stream.codec_context.width or head[0][1].width
        height = stream.codec_context.height or head[0][1].height
        num_frames = stream.frames or max(2, round(duration * fps))
    return VideoInfo(path, int(width), int(height), float(fps), float(duration), int(num_frames))


def read_clip(
    path: str | os.PathLike,
    start: float = 0.0,
    num_frames: int = CLIP_FRAMES,
    fps: float = CLIP_FPS,
    size: int | None = None,
) -> np.ndarray:
    """Frames at start + i / fps (i < num_frames) as uint8 (f, h, w, 3) RGB.

    Each frame is the last decoded one at or before its time. Past the end of
    the video the last frame repeats, so short videos still give num_frames.
    ``size`` resizes the shorter side to ``size`` and center-crops a square.
    """
    _check_sampling(num_frames, fps, start)
    path = os.fspath(path)
    with closing(_frames_from(path, start)) as frames:
        return next(_sample_windows(frames, [start], num_frames, fps, size))


def iter_clips(
    path: str | os.PathLike,
    num_frames: int = CLIP_FRAMES,
    fps: float = CLIP_FPS,
    max_clips: int | None = None,
    size: int | None = None,
) -> Iterator[np.ndarray]:
    """Consecutive non-overlapping clips (f, h, w, 3), one decode pass.

    Window k starts at k * num_frames / fps. The last partial window is padded
    with the last frame; a video shorter than one window gives one clip.
    """
    _check_sampling(num_frames, fps, max_clips=max_clips)
    window = num_frames / fps
    starts: Iterable[float] = (k * window for k in itertools.count())
    if max_clips is not None:
        starts = itertools.islice(starts, max_clips)
    with closing(_frames_from(os.fspath(path), 0.0)) as frames:
        yield from _sample_windows(frames, starts, num_frames, fps, size)


def read_clips(
    path: str | os.PathLike,
    max_clips: int | None = MAX_QA_CLIPS,
    num_frames: int = CLIP_FRAMES,
    fps: float = CLIP_FPS,
    size: int | None = None,
) -> np.ndarray:
    """Clips covering a video, (n, f, h, w, 3) with n <= max_clips.

    A video of more than ``max_clips`` windows is not truncated to its opening
    seconds: the ``max_clips`` windows are spread uniformly (first and last
    included) over the whole video, because questions about a video (e.g.
    EgoSchema's 3-minute clips) concern all of it. Chosen windows stay on the
    regular 2-second grid and are read in one decode pass.
    """
    _check_sampling(num_frames, fps, max_clips=max_clips)
    window = num_frames / fps
    n_windows = None
    if max_clips is not None:
        n_windows = max(1, math.ceil(probe_video(path).duration / window - _TIME_EPS))
    if n_windows is None or n_windows <= max_clips:
        return np.stack(list(iter_clips(path, num_frames, fps, max_clips, size)))
    picks = np.unique(np.round(np.linspace(0, n_windows - 1, max_clips)).astype(int))
    logger.debug("%s: %d windows, keeping %d spread ones", path, n_windows, len(picks))
    with closing(_frames_from(os.fspath(path), 0.0)) as frames:
        clips = _sample_windows(frames, (k * window for k in picks), num_frames, fps, size)
        return np.stack(list(clips))


# ------------------------------------------------------------- array helpers
def resize_center_crop(frames: np.ndarray | torch.Tensor, size: int) -> np.ndarray | torch.Tensor:
    """Shorter side -> ``size`` (antialiased bilinear), then a centered square crop.

    uint8 numpy (f, h, w, 3) -> uint8 (f, size, size, 3) (grayscale (f, h, w)
    or (f, h, w, 1) is expanded to RGB); float torch (f, 3, h, w) -> float
    (f, 3, size, size). The numpy path runs torch's uint8 kernel, several
    times faster than PIL on HD frames.
    """
    if isinstance(frames, torch.Tensor):
        return _resize_crop_chw(frames, size)
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[..., None]
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    chw = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.uint8)).permute(0, 3, 1, 2)
    # numpy copies the strided crop far faster than torch's .contiguous() here
    return np.ascontiguousarray(_resize_crop_chw(chw, size).permute(0, 2, 3, 1).numpy())


def _resize_crop_chw(frames: torch.Tensor, size: int) -> torch.Tensor:
    """(f, c, h, w) -> (f, c, size, size); uint8 stays uint8."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    h, w = frames.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        frames = F.interpolate(frames, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    return frames[..., top : top + size, left : left + size]


def to_tensor(frames_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (f, h, w, 3) -> float32 (f, 3, h, w) in [-1, 1]."""
    x = torch.as_tensor(frames_uint8)
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


def to_uint8(video: torch.Tensor | np.ndarray) -> np.ndarray:
    """float (f, 3, h, w) in [-1, 1] (clamped) -> uint8 (f, h, w, 3).

    A uint8 array that is already (f, h, w, 3) is returned unchanged.
    """
    if isinstance(video, np.ndarray) and video.dtype == np.uint8:
        return video
    x = torch.as_tensor(video).detach().float().cpu()
    x = ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def __getattr__(name: str):
    # Writing lives in divot.video_write; re-exported lazily (PEP 562) so callers need one
    # import and the two modules do not import each other at load time.
    if name in ("write_video", "side_by_side"):
        from divot import video_write
        return getattr(video_write, name)
    raise AttributeError(f"module 'divot.video_io' has no attribute {name!r}")
