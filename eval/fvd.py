"""Fréchet distances between two sets of video features (FVD and its stand-ins).

The Fréchet distance between Gaussians N(mu1, S1) and N(mu2, S2) is

    d² = |mu1 - mu2|² + tr(S1) + tr(S2) - 2 tr((S1^½ S2 S1^½)^½)

(Dowson & Landau 1982). The trace term is computed from the *symmetric* product
S1^½ S2 S1^½, whose eigenvalues are those of S1 S2 but which, unlike S1 S2, an
eigendecomposition handles stably: it is positive semi-definite, so eigenvalues that
round-off pushes slightly below zero are clamped to zero before the square root. All
of it runs in float64 (torch's CPU linear algebra), and the result is clamped at zero,
so identical sets give ~0 and never a negative distance. With I3D features
(:mod:`eval.i3d`) this is FVD (Unterthiner et al. 2018).

When no I3D weights are at hand, :func:`tokenizer_features` gives the project's own
Divot tokenizer features (tokens mean-pooled per clip). Their Fréchet distance is
reported as ``tokenizer_fd`` and is **not FVD**: a different network, not comparable
with published FVD numbers, only useful to compare checkpoints of this project.
:class:`FeatureStore` keeps each generated video's features on disk, so an interrupted
evaluation resumes without generating its videos again.

Axis glossary: n = videos, d = feature width, c = clips, t = tokens per clip.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from llm.chat import array_clips

TOKENIZER_FD_NOTE = ("NOT FVD: Fréchet distance of the Divot tokenizer's own features (64 tokens mean-pooled "
                     "per clip); comparable between checkpoints of this project only, never with published FVD")
FVD_NEEDS_I3D = ("FVD needs I3D weights: pass --i3d PATH (a local pytorch-i3d style Kinetics-400 state dict, "
                 "e.g. rgb_imagenet.pt); nothing is downloaded")


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean (d,), covariance (d, d)) of ``features`` (n, d), float64; needs n >= 2."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be a 2-d array (videos, width), got shape {x.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 feature vectors, got {x.shape[0]}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or inf")
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix (tiny negative eigenvalues → 0)."""
    sym = (matrix + matrix.T) / 2  # round-off can leave it slightly asymmetric
    values, vectors = torch.linalg.eigh(sym)
    return (vectors * values.clamp_min(0.0).sqrt()) @ vectors.T


def _float64(x, ndim: int) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x, dtype=np.float64))
    return t.reshape(-1) if ndim == 1 else (t.reshape(1, 1) if t.ndim == 0 else t)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2); >= 0.

    The linear algebra runs in torch (float64, CPU), which follows torch's thread setting."""
    mu1, mu2 = _float64(mu1, 1), _float64(mu2, 1)
    s1, s2 = _float64(sigma1, 2), _float64(sigma2, 2)
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shapes do not fit: mu1 {tuple(mu1.shape)}, sigma1 {tuple(s1.shape)}, mu2 "
                         f"{tuple(mu2.shape)}, sigma2 {tuple(s2.shape)}; expected (d,) and (d, d) with one d")
    root1 = sqrt_psd(s1)
    inner = root1 @ s2 @ root1
    cross = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0.0).sqrt().sum()
    diff = mu1 - mu2
    value = float(diff @ diff + torch.trace(s1) + torch.trace(s2) - 2.0 * cross)
    return max(value, 0.0)


def features_distance(real, generated) -> float:
    """Fréchet distance between two feature sets (n1, d) and (n2, d)."""
    return frechet_distance(*feature_stats(real), *feature_stats(generated))


@torch.no_grad()
def tokenizer_features(pipe, videos: Sequence[np.ndarray], batch_size: int = 8) -> np.ndarray:
    """(n, token_dim) float64: each video's first 2-second clip through the pipeline's Divot
    tokenizer, its tokens mean-pooled. ``videos`` are uint8 (f, h, w, 3) at 8 fps."""
    feats = [np.zeros((0, pipe.tokenizer.config.token_dim))]
    for start in range(0, len(videos), batch_size):
        clips = torch.cat([array_clips(v, pipe.frame_size, 1)[:1] for v in videos[start:start + batch_size]])
        feats.append(pipe.tokenize(clips).mean(dim=1).double().numpy())
    return np.concatenate(feats)


class FeatureStore:
    """Per-video features as ``folder/<uid>.npz``, so a resumed run needs no regeneration.
    ``extractors`` map a name to a function of a list of uint8 videos → (n, d) array."""

    def __init__(self, folder: Path, extractors: dict[str, Callable[[list[np.ndarray]], np.ndarray]]):
        self.folder, self.extractors = Path(folder), extractors

    def _path(self, uid: str) -> Path:
        return self.folder / f"{file_stem(uid)}.npz"

    def has(self, uid: str) -> bool:
        return not self.extractors or self._path(uid).is_file()

    def add(self, uid: str, frames: np.ndarray) -> None:
        if not self.extractors:
            return
        feats = {name: fn([frames])[0] for name, fn in self.extractors.items()}
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self._path(uid).with_suffix(".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **feats)
        os.replace(tmp, self._path(uid))

    def stack(self, uids: Sequence[str]) -> dict[str, np.ndarray]:
        """name → (n, d) features of ``uids``, in order."""
        out: dict[str, list[np.ndarray]] = {name: [] for name in self.extractors}
        for uid in uids:
            with np.load(self._path(uid)) as data:
                for name, parts in out.items():
                    parts.append(data[name])
        return {name: np.stack(parts) for name, parts in out.items()}


def file_stem(uid: str) -> str:
    """``uid`` made safe as a file name."""
    return re.sub(r"[^\w.-]", "_", uid)
