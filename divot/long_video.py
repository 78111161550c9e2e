"""Videos longer than one 2-second clip: clip-by-clip extension with known frames.

Divot describes a video as one 64-token set per 2-second clip (DESIGN.md §2). To
make one continuous video from several such sets, the first clip is decoded as
usual and every next clip is sampled with the last ``overlap`` frames of the
previous clip given as its known first frames (:mod:`divot.conditioning`; the
"guidance" method is VDM's reconstruction guidance, which Ho et al. 2022 found
far better than "replacement" for extension, DESIGN.md §6). The duplicated
overlap is dropped when the clips are joined, so each further clip adds
``f − overlap`` new frames. :func:`join_continuity` measures how smooth the joins are.

Axes: k = clips, f = frames per clip, F = frames of the whole video, n = tokens per
clip, d = token width, c = channels, h, w = height, width.
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import Callable, Sequence

import numpy as np
import torch

from divot.conditioning import check_method
from divot.probe import probe_clip

logger = logging.getLogger(__name__)

DEFAULT_OVERLAP = 4


def clips_needed(num_frames: int, clip_frames: int, overlap: int) -> int:
    """How many clips, each adding ``clip_frames − overlap`` frames after the first, make
    at least ``num_frames`` frames."""
    _check_overlap(overlap, clip_frames)
    if num_frames < 1:
        raise ValueError(f"a video needs at least one frame, got {num_frames}")
    return 1 + max(0, math.ceil((num_frames - clip_frames) / (clip_frames - overlap)))


def join_indices(num_clips: int, clip_frames: int, overlap: int) -> list[int]:
    """Index of the first new frame of each clip after the first, in the joined video
    (the join lies between that frame and the one before it)."""
    _check_overlap(overlap, clip_frames)
    return [clip_frames + j * (clip_frames - overlap) for j in range(num_clips - 1)]


def _check_overlap(overlap: int, clip_frames: int) -> None:
    if not 0 <= overlap < clip_frames:
        raise ValueError(f"overlap must be in [0, {clip_frames}) frames for {clip_frames}-frame clips, got {overlap}")


def _as_clip_tokens(tokens_per_clip, num_tokens: int, token_dim: int) -> torch.Tensor:
    """(k, n, d) from a tensor or a list of (n, d) / (1, n, d) tensors."""
    if isinstance(tokens_per_clip, torch.Tensor):
        tokens = tokens_per_clip
    elif isinstance(tokens_per_clip, Sequence) and len(tokens_per_clip) > 0:
        tokens = torch.cat([torch.as_tensor(t).reshape(-1, *torch.as_tensor(t).shape[-2:]) for t in tokens_per_clip])
    else:
        raise TypeError("tokens_per_clip must be a (k, n, d) tensor or a non-empty list of (n, d) tensors")
    if tokens.ndim != 3 or tuple(tokens.shape[1:]) != (num_tokens, token_dim) or tokens.shape[0] == 0:
        raise ValueError(f"tokens_per_clip must be (k, {num_tokens}, {token_dim}) with k >= 1, "
                         f"got {tuple(tokens.shape)}")
    return tokens


def extend_video(detok, tokens_per_clip, overlap: int = DEFAULT_OVERLAP, method: str = "guidance",
                 seed: int | None = None, generator: torch.Generator | None = None,
                 callback: Callable[[int, int], None] | None = None, **decode_kw) -> torch.Tensor:
    """One continuous video (F, 3, H, W) in [-1, 1] (8 fps) from k clips' tokens.

    Clip 1 is decoded normally; clip j+1 is sampled with the last ``overlap`` frames of
    clip j as its known first frames (``method``: "guidance", "replacement" or "clean",
    see :meth:`DivotDetokenizer.decode`). F = f + (k − 1)(f − overlap). ``seed`` (or a
    ``generator``) makes it reproducible; ``callback(done, total)`` counts sampler steps
    over all clips; other keywords go to ``detok.decode`` (steps, guidance_scale, …).
    """
    cfg = detok.config
    f = decode_kw.get("num_frames") or cfg.num_frames
    _check_overlap(overlap, f)
    if "known_frames" in decode_kw or "known_method" in decode_kw:
        raise TypeError("extend_video sets known_frames itself; choose the method with method=")
    if seed is not None and generator is not None:
        raise ValueError("pass seed= or generator=, not both")
    check_method(method, decode_kw.get("guidance_weight", 2.0))  # before the first clip's work
    tokens = _as_clip_tokens(tokens_per_clip, cfg.num_tokens, cfg.token_dim)
    device = next(detok.parameters()).device
    tokens = tokens.to(device, torch.float32)
    if seed is not None:
        generator = torch.Generator(device).manual_seed(seed)
    k = tokens.shape[0]
    pieces, prev = [], None
    for j in range(k):
        kw = dict(decode_kw, generator=generator)
        if callback is not None:
            kw["callback"] = lambda i, n, j=j: callback(j * n + i, k * n)
        if prev is not None and overlap > 0:
            kw.update(known_frames={i: prev[f - overlap + i] for i in range(overlap)}, known_method=method)
        clip = detok.decode(tokens[j:j + 1], **kw)[0]
        pieces.append(clip if prev is None else clip[overlap:])
        prev = clip
        logger.info("long video: clip %d/%d decoded (%s, overlap %d)", j + 1, k,
                    "first" if j == 0 else method, overlap)
    return torch.cat(pieces)


def _float_frames(video) -> torch.Tensor:
    """(F, 3, H, W) float in [-1, 1] from that or uint8 (F, H, W, 3)."""
    if isinstance(video, np.ndarray) or (isinstance(video, torch.Tensor) and video.dtype == torch.uint8):
        x = torch.as_tensor(video)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"a uint8 video must be (F, H, W, 3), got {tuple(x.shape)}")
        return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if not isinstance(video, torch.Tensor) or video.ndim != 4 or video.shape[1] != 3:
        raise ValueError(f"video must be (F, 3, H, W) float or (F, H, W, 3) uint8, got "
                         f"{getattr(video, 'shape', type(video).__name__)}")
    return video.detach().float().cpu()


def _ratio(join: float | None, within: float | None, floor: float) -> float | None:
    if join is None or within is None or math.isnan(join) or math.isnan(within):
        return None
    return join / max(within, floor)


def join_continuity(video, joins: Sequence[int], min_pixel_step: float = 1e-6,
                    min_position_step: float = 0.5) -> dict:
    """Continuity at clip joins, each relative to the mean within-clip frame step.

    ``joins``: first new frame of each clip after the first (:func:`join_indices`).
    Pixels: MSE between consecutive frames. Position: the distance (64-px canvas units)
    the :mod:`divot.probe` track of each object moves between consecutive frames,
    averaged over objects. A ratio near 1 means the join is as smooth as motion within a
    clip. Denominators are floored (``min_*_step``; 0.5 px is below the probe's 0.6
    px/frame "still" threshold) so still scenes do not divide by ~0.
    """
    x = _float_frames(video)
    n = x.shape[0]
    bad = [j for j in joins if not 1 <= j < n]
    if bad or not joins:
        raise ValueError(f"joins must be frame indices in [1, {n}), got {list(joins)}")
    step_mse = (x[1:] - x[:-1]).pow(2).mean(dim=(1, 2, 3)).numpy()  # step i: frame i → i+1
    at_join = np.zeros(n - 1, dtype=bool)
    at_join[[j - 1 for j in joins]] = True
    out = {"num_joins": len(joins), "pixel_mse_per_join": step_mse[at_join].tolist(),
           "pixel_mse_join": float(step_mse[at_join].mean()),
           "pixel_mse_within": float(step_mse[~at_join].mean()) if (~at_join).any() else None}
    out["pixel_ratio"] = _ratio(out["pixel_mse_join"], out["pixel_mse_within"], min_pixel_step)
    objects = probe_clip(x)
    if objects:
        tracks = np.array([o.track for o in objects], dtype=np.float64)  # (objects, F, 2)
        steps = np.linalg.norm(np.diff(tracks, axis=1), axis=-1)  # (objects, F − 1), NaN where lost
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an object lost at a join gives an all-NaN mean
            per_join = np.nanmean(steps[:, at_join], axis=0)
            join, within = np.nanmean(steps[:, at_join]), np.nanmean(steps[:, ~at_join])
        out.update(position_jump_per_join=[None if math.isnan(v) else float(v) for v in per_join],
                   position_jump_join=None if math.isnan(join) else float(join),
                   position_step_within=None if math.isnan(within) else float(within))
    else:
        out.update(position_jump_per_join=[None] * len(joins), position_jump_join=None, position_step_within=None)
    out["position_ratio"] = _ratio(out["position_jump_join"], out["position_step_within"], min_position_step)
    out["num_objects"] = len(objects)
    return out

