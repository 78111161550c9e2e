"""Copy detection for generated videos: descriptors, exact nearest-neighbour search, motion tracks.

After "Frame by Familiar Frame" (Rahman et al. 2024; DESIGN.md §6): a clip's content
descriptor is the concatenation of per-frame copy-detection descriptors of a fixed frame
subset (the tokenizer's frames 0, 4, 8, 12, 15), L2-normalised; content replication is the
cosine similarity of a generated clip to its nearest training clip, found by exact search.

Two frame descriptors:

* :class:`SSCDDescriptor` — a local SSCD TorchScript file (Pizzi et al. 2022, e.g.
  ``sscd_disc_mixup.torchscript.pt``). Frames are resized (shorter side) and centre-cropped to
  ``SSCD_SIZE`` = 288 px, SSCD's evaluation size, and ImageNet-normalised. Cosines are used
  raw, as the paper does; a top similarity >= 0.5 counts as a copy (:data:`SSCD_THRESHOLD`).
* :class:`DivotViTDescriptor` — the Divot tokenizer's own ViT, **not SSCD**: patch features
  mean-pooled over the cells of a 4×4 grid (keeping coarse position, which a whole-frame mean
  throws away), minus the frame's overall mean (so a global brightness change cancels). A
  ViT's features share a large common component (the black Shapes background alone makes any
  two clips look alike), so these descriptors are also centred on the training set's mean
  before normalising. Its threshold (:data:`VIT_THRESHOLD`) is calibrated on the planted set of
  tests/test_eval_replication.py with a random tiny tokenizer: exact, noisy, 1-px shifted,
  brightened and half-resolution copies score >= 0.98, fresh clips <= 0.63. Recalibrate it
  for a trained tokenizer. Width: 16 × ViT width per frame (400 KB of float32 per clip for ViT-H).

Motion replication uses :func:`divot.probe.probe_clip` tracks (object centres per frame,
64-px canvas units, so any resolution compares): two objects follow the same trajectory when
their mean centre distance is small; similarity exp(-distance / TRACK_SCALE_PX). This reads
Shapes-world objects only; a clip where the probe finds none gets no motion score. For any
video, :func:`motion_descriptors` (temporal differences of the frame descriptors) give a
second, uncalibrated motion similarity.

Axis glossary: n = generated clips, m = training clips, f = descriptor frames (5),
d = descriptor width, k = object tracks per clip, t = video frames, xy = track coordinates.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from divot.probe import probe_clip
from divot.video_io import CLIP_FRAMES, TOKENIZER_FRAME_INDICES, resize_center_crop, to_tensor

logger = logging.getLogger(__name__)

FRAME_INDICES = TOKENIZER_FRAME_INDICES
SSCD_SIZE = 288
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Image-replication studies with SSCD (Somepalli et al. 2023) call a pair with similarity > 0.5
# a copy; "Frame by Familiar Frame" reports mean top similarities around 0.6 against it.
SSCD_THRESHOLD = 0.5
# Calibrated on the planted set (see module docstring): copies score >= 0.98, fresh clips <= 0.63.
VIT_THRESHOLD = 0.8
VIT_NOTE = "divot-vit (not SSCD)"
VIT_GRID = 4
MAX_TRACKS = 4  # Shapes clips hold 1-2 objects; room for more in other probe-able videos
TRACK_SCALE_PX = 4.0
# exp(-d/4) >= 0.5 ⇔ mean centre distance <= 2.8 px (64-px units): well under the smallest
# object's side (12 px), well over the probe's error on noisy or blurred frames.
MOTION_THRESHOLD = 0.5
SEARCH_CHUNK = 4096
MOTION_BLOCK = 8_000_000


# ------------------------------------------------------------------ frame descriptors
def _pick_frames(video: np.ndarray) -> np.ndarray:
    """uint8 (t, h, w, 3) → the FRAME_INDICES frames (a short clip repeats its last frame)."""
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8 or len(video) == 0:
        raise ValueError(f"a video must be uint8 (frames, h, w, 3) with frames >= 1; got {video.dtype} {video.shape}")
    if len(video) < CLIP_FRAMES:
        video = np.concatenate([video, np.repeat(video[-1:], CLIP_FRAMES - len(video), axis=0)])
    return video[list(FRAME_INDICES)]


class SSCDDescriptor:
    """Frames → SSCD descriptors through a TorchScript file (loaded locally, never downloaded)."""

    name = "sscd"

    def __init__(self, path, device: str | torch.device = "cpu", size: int = SSCD_SIZE, batch_size: int = 32):
        try:
            self.model = torch.jit.load(str(path), map_location=device).eval()
        except (RuntimeError, ValueError, OSError) as exc:
            raise FileNotFoundError(f"cannot load the SSCD TorchScript file '{path}': {exc}") from exc
        self.device, self.size, self.batch_size = torch.device(device), int(size), int(batch_size)
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """uint8 (n, h, w, 3) → float32 (n, d)."""
        x = torch.from_numpy(resize_center_crop(frames, self.size)).permute(0, 3, 1, 2).float() / 255.0
        x = (x - self.mean) / self.std
        out = [self.model(x[i:i + self.batch_size].to(self.device)).float().cpu()
               for i in range(0, len(x), self.batch_size)]
        return torch.cat(out).reshape(len(x), -1).numpy()


class DivotViTDescriptor:
    """Frames → the Divot tokenizer ViT's patch features, mean-pooled per cell of a VIT_GRID² grid."""

    name = VIT_NOTE

    def __init__(self, vit: torch.nn.Module, frame_size: int, device: str | torch.device = "cpu",
                 batch_size: int = 32):
        self.vit = vit.to(device).eval()
        self.frame_size, self.device, self.batch_size = int(frame_size), torch.device(device), int(batch_size)

    @classmethod
    def from_tokenizer_dir(cls, directory, device: str | torch.device = "cpu") -> "DivotViTDescriptor":
        from divot.tokenizer import DivotTokenizer
        from llm.features import tokenizer_frame_size
        return cls(DivotTokenizer.from_pretrained(directory).vit, tokenizer_frame_size(directory), device)

    @torch.no_grad()
    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """uint8 (n, h, w, 3) → float32 (n, grid·grid·d)."""
        x = to_tensor(resize_center_crop(frames, self.frame_size))
        gh, gw = self.vit.grid
        out = []
        for i in range(0, len(x), self.batch_size):
            feats = self.vit(x[i:i + self.batch_size].to(self.device)).float()
            grid = rearrange(feats, "n (gh gw) d -> n d gh gw", gh=gh, gw=gw)
            pooled = F.adaptive_avg_pool2d(grid, (VIT_GRID, VIT_GRID))
            # Relative to the frame's mean: a global brightness change shifts every cell alike.
            pooled = pooled - grid.mean(dim=(2, 3), keepdim=True)
            out.append(rearrange(pooled, "n d a b -> n (a b d)").cpu())
        return torch.cat(out).numpy()


FrameDescriptor = Callable[[np.ndarray], np.ndarray]


def frame_descriptors(videos: Sequence[np.ndarray], descriptor: FrameDescriptor) -> np.ndarray:
    """Raw (un-normalised) per-frame descriptors of each video's FRAME_INDICES frames: (n, f, d)."""
    picked = [_pick_frames(v) for v in videos]
    if not picked:
        raise ValueError("no videos to describe")
    # Frames are resized inside the descriptor, so videos of different sizes go one at a time.
    raw = [descriptor(p) for p in picked]
    return np.stack(raw).astype(np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def clip_descriptors(raw: np.ndarray, center: np.ndarray | None = None) -> np.ndarray:
    """(n, f, d) raw frame descriptors → (n, f·d) unit clip descriptors: each frame's descriptor
    (minus ``center``, when given) L2-normalised, concatenated, normalised again."""
    x = np.asarray(raw, dtype=np.float32)
    if center is not None:
        x = x - center
    return _unit(rearrange(_unit(x), "n f d -> n (f d)"))


def motion_descriptors(raw: np.ndarray, center: np.ndarray | None = None) -> np.ndarray:
    """(n, f, d) raw frame descriptors → (n, (f-1)·d) unit vectors of the frame-to-frame changes
    of the normalised descriptors: an appearance-light motion signature for any video (a clip
    without change gives zeros, similar to nothing)."""
    x = np.asarray(raw, dtype=np.float32)
    x = _unit(x - center if center is not None else x)
    return _unit(rearrange(np.diff(x, axis=1), "n f d -> n (f d)"))


# ------------------------------------------------------------------ exact search
@torch.no_grad()
def nearest(queries: np.ndarray, keys: np.ndarray, chunk: int = SEARCH_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-1 inner product: (similarity (n,), index (n,)) of each query's best key.

    Batched matrix products over ``chunk`` × ``chunk`` blocks, so memory stays bounded whatever
    the sizes; ties keep the lowest index."""
    q, k = torch.as_tensor(np.asarray(queries, np.float32)), torch.as_tensor(np.asarray(keys, np.float32))
    if q.ndim != 2 or k.ndim != 2 or q.shape[1] != k.shape[1] or len(k) == 0:
        raise ValueError(f"need queries (n, d) and a non-empty keys (m, d); got {tuple(q.shape)}, {tuple(k.shape)}")
    best = torch.full((len(q),), -math.inf)
    index = torch.zeros(len(q), dtype=torch.long)
    for start in range(0, len(k), chunk):
        for qs in range(0, len(q), chunk):
            sims = q[qs:qs + chunk] @ k[start:start + chunk].T
            value, where = sims.max(dim=1)
            better = value > best[qs:qs + chunk]
            best[qs:qs + chunk] = torch.where(better, value, best[qs:qs + chunk])
            index[qs:qs + chunk] = torch.where(better, where + start, index[qs:qs + chunk])
    return best.numpy(), index.numpy()


# ------------------------------------------------------------------ motion
def motion_tracks(video: np.ndarray) -> np.ndarray:
    """Probe object tracks of one video as (MAX_TRACKS, t, 2) float32, NaN where absent."""
    found = probe_clip(video)
    frames = len(video)
    out = np.full((MAX_TRACKS, frames, 2), np.nan, np.float32)
    for i, obj in enumerate(found[:MAX_TRACKS]):
        out[i] = np.asarray(obj.track, np.float32)[:frames]
    if len(found) > MAX_TRACKS:
        logger.warning("probe found %d objects; motion uses the first %d", len(found), MAX_TRACKS)
    return out


def _track_similarity(gen: np.ndarray, train: np.ndarray) -> np.ndarray:
    """(n, k, t, xy) × (m, k, t, xy) → (n, m): mean over each generated object of
    exp(-distance to the nearest training object / TRACK_SCALE_PX); NaN without objects."""
    t = min(gen.shape[2], train.shape[2])
    a = rearrange(gen[:, :, :t], "n k t xy -> n 1 k 1 t xy")
    b = rearrange(train[:, :, :t], "m k t xy -> 1 m 1 k t xy")
    step = np.linalg.norm(a - b, axis=-1)  # (n, m, k, k, t), NaN where either object is absent
    seen = np.isfinite(step).sum(axis=-1)
    dist = np.where(seen > 0, np.nansum(np.nan_to_num(step, nan=0.0), axis=-1) / np.maximum(seen, 1), np.inf)
    sim = np.exp(-dist.min(axis=3) / TRACK_SCALE_PX)  # best training object per generated one: (n, m, k)
    present = np.isfinite(gen[:, :, :t]).any(axis=(2, 3))[:, None, :]
    count = present.sum(axis=-1)
    total = np.where(present, sim, 0.0).sum(axis=-1)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def nearest_motion(gen: np.ndarray, train: np.ndarray, chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(similarity (n,), index (n,)) of each generated clip's closest training trajectories;
    similarity NaN (index -1) where the probe found no object in the generated clip. Training
    clips go ``chunk`` at a time (default: ~8M pairwise distances per block)."""
    gen, train = np.asarray(gen, np.float32), np.asarray(train, np.float32)
    if chunk is None:
        chunk = max(1, MOTION_BLOCK // max(1, gen.shape[0] * gen.shape[1] ** 2 * gen.shape[2]))
    best = np.full(len(gen), -np.inf)
    index = np.full(len(gen), -1)
    for start in range(0, len(train), chunk):
        sims = _track_similarity(gen, train[start:start + chunk])
        sims = np.where(np.isnan(sims), -np.inf, sims)
        where = sims.argmax(axis=1) if sims.shape[1] else np.zeros(len(gen), int)
        value = sims[np.arange(len(gen)), where] if sims.shape[1] else best
        better = value > best
        best, index = np.where(better, value, best), np.where(better, where + start, index)
    no_objects = ~np.isfinite(best)
    return np.where(no_objects, np.nan, best), np.where(no_objects, -1, index)
