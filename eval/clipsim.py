"""CLIPSIM: how well generated videos match their captions, measured by CLIP.

CLIPSIM (Wu et al. 2021, GODIVA; the text-to-video metric of Divot's Table 4) of one video
is the mean over its frames of cos(CLIP image embedding of the frame, CLIP text embedding of
the caption); a set's CLIPSIM is the mean over its videos. We report it **×100** as
``clipsim`` (the convention of recent text-to-video papers, e.g. 29.38) and the plain cosine
as ``clipsim_raw`` (the scale Divot's paper prints: 0.2938). Numbers depend on the CLIP
model: papers mostly use ViT-B/32; name the architecture with every result.

CLIP comes from ``open_clip`` (``pip install open_clip_torch``, optional) with weights from a
local file only: ``open_clip.create_model_and_transforms(arch, pretrained=PATH)`` loads a
file path directly, and the path is checked first so that a typo never turns into a
download. ``open_clip.get_tokenizer(arch)`` uses the tokenizer bundled with the package for
the standard CLIP architectures.

Captions come from an MSR-VTT-style JSON file (:func:`read_captions`).

Axis glossary: f = frames, d = CLIP embedding width.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from divot.metrics import mean_ci95

logger = logging.getLogger(__name__)

OPEN_CLIP_HINT = "CLIPSIM needs open_clip, which is not installed: pip install open_clip_torch"
DEFAULT_ARCH = "ViT-B-32"
# Names under which open_clip / the Hugging Face hub store weights inside a model folder.
_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors",
                 "pytorch_model.bin")


@dataclass(frozen=True)
class CaptionItem:
    uid: str      # "<video>#<k>": the k-th caption of that video in the file
    video: str
    caption: str


def read_captions(path: str | os.PathLike, one_per_video: bool = False) -> list[CaptionItem]:
    """Captions from a JSON list of ``{"video" or "video_id": …, "caption": …}`` (or MSR-VTT's
    ``{"sentences": [...]}`` file). ``one_per_video`` keeps each video's first caption."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file '{path}' does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if isinstance(data, dict) and isinstance(data.get("sentences"), list):
        data = data["sentences"]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of {{video|video_id, caption}} objects")
    items, seen = [], Counter()
    for i, row in enumerate(data):
        video = row.get("video", row.get("video_id")) if isinstance(row, dict) else None
        text = row.get("caption") if isinstance(row, dict) else None
        if video is None or not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}: item {i} needs a 'video' (or 'video_id') and a non-empty 'caption'; "
                             f"got {row!r}")
        video = str(video)
        if one_per_video and seen[video]:
            continue
        items.append(CaptionItem(f"{video}#{seen[video]}", video, text.strip()))
        seen[video] += 1
    if not items:
        raise ValueError(f"{path}: no captions")
    return items


def clip_similarity(image_embeddings: torch.Tensor, text_embedding: torch.Tensor) -> float:
    """Mean over frames of the cosine between (f, d) frame embeddings and the (d,) text one."""
    if image_embeddings.ndim != 2 or text_embedding.ndim != 1 or image_embeddings.shape[1] != text_embedding.shape[0]:
        raise ValueError(f"expected (f, d) and (d,) embeddings, got {tuple(image_embeddings.shape)} "
                         f"and {tuple(text_embedding.shape)}")
    cos = F.normalize(image_embeddings.double(), dim=-1) @ F.normalize(text_embedding.double(), dim=0)
    return float(cos.mean())


def _weights_file(path: Path) -> Path:
    if path.is_dir():
        for name in _WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"CLIP folder {path} holds none of {', '.join(_WEIGHT_FILES)}")
    if not path.is_file():
        raise FileNotFoundError(f"CLIP weights '{path}' do not exist (nothing is downloaded; pass a local file)")
    return path


def import_open_clip():
    """The ``open_clip`` module, or ImportError with the pip command to install it."""
    try:
        import open_clip
    except ImportError as exc:
        raise ImportError(OPEN_CLIP_HINT) from exc
    return open_clip


class ClipScorer:
    """An open_clip model, its evaluation transform and tokenizer, for CLIPSIM."""

    def __init__(self, model, preprocess, tokenizer, device: str | torch.device = "cpu", arch: str = ""):
        self.model = model.to(device).eval().requires_grad_(False)
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.device, self.arch = torch.device(device), arch

    @classmethod
    def from_local(cls, path: str | os.PathLike, arch: str = DEFAULT_ARCH,
                   device: str | torch.device = "cpu") -> "ClipScorer":
        """``arch`` (an open_clip model name) with the weights of the local ``path`` (file or folder)."""
        open_clip = import_open_clip()
        weights = _weights_file(Path(path))
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=str(weights))
        logger.info("CLIP %s loaded from %s", arch, weights)
        return cls(model, preprocess, open_clip.get_tokenizer(arch), device, arch)

    @torch.no_grad()
    def text_embedding(self, text: str) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer([text]).to(self.device))[0].float().cpu()

    @torch.no_grad()
    def image_embeddings(self, frames: np.ndarray, batch_size: int = 16) -> torch.Tensor:
        """uint8 (f, h, w, 3) → (f, d) embeddings, each frame through CLIP's own (PIL) transform."""
        out = []
        for start in range(0, len(frames), batch_size):
            chunk = frames[start:start + batch_size]
            pixels = torch.stack([self.preprocess(Image.fromarray(np.asarray(f))) for f in chunk])
            out.append(self.model.encode_image(pixels.to(self.device)).float().cpu())
        return torch.cat(out)

    def score(self, frames: np.ndarray, text: str) -> float:
        """Raw CLIPSIM (a cosine in [-1, 1]) of one video and its caption."""
        return clip_similarity(self.image_embeddings(frames), self.text_embedding(text))


def summarize(raw_scores: Sequence[float]) -> dict:
    """``clipsim`` (×100), ``clipsim_raw`` and the ×100 95% half-width over videos."""
    if not raw_scores:
        return {"clipsim": None, "clipsim_raw": None, "clipsim_ci95": None, "num_videos": 0}
    mean, half = mean_ci95(raw_scores)
    return {"clipsim": 100 * mean, "clipsim_raw": mean, "clipsim_ci95": None if np.isnan(half) else 100 * half,
            "num_videos": len(raw_scores), "convention": "mean over frames of cos(image, text), x100"}
