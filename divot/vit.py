"""The tokenizer's image encoder: any timm ViT, read before its final norm, CLS dropped.

DESIGN.md §2.1: features are the output of the last transformer block before the
final norm/projection, prefix (CLS/register) tokens removed, e.g. 256 × 1280 per
frame for OpenCLIP ViT-H/14 at 224 px. Weights never download: the model is
built with random init and real weights come only from a local file the user
names (timm or OpenCLIP layout; timm's own filter converts OpenCLIP names).

Axes: n = images (frames × batch), l = patch tokens, d = width.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ViTConfig:
    name: str = "vit_huge_patch14_clip_224"  # any timm ViT name
    img_size: int = 224
    # Optional overrides of the timm architecture (None keeps the named model's value).
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    frozen: bool = True
    checkpoint: str | None = None  # local timm/OpenCLIP weights; never downloaded


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """safetensors where possible, else ``torch.load(weights_only=True)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


class ViTFeatures(nn.Module):
    """Wraps a timm ViT; ``forward`` maps frames in [-1, 1] to patch features."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        overrides = {k: getattr(cfg, k) for k in ("patch_size", "embed_dim", "depth", "num_heads")
                     if getattr(cfg, k) is not None}
        self.model = timm.create_model(cfg.name, pretrained=False, num_classes=0,
                                       img_size=cfg.img_size, **overrides)
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1), persistent=False)
        if cfg.checkpoint:
            self.load_weights(cfg.checkpoint)
        if cfg.frozen:
            self.requires_grad_(False)

    @property
    def width(self) -> int:
        return self.model.embed_dim

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.model.patch_embed.grid_size)

    def load_weights(self, path: str | Path) -> None:
        from timm.models.vision_transformer import checkpoint_filter_fn
        state = checkpoint_filter_fn(load_state_dict_file(path), self.model)
        # The classifier/projection head is unused (features are taken before it).
        state = {k: v for k, v in state.items() if not k.startswith("head")}
        result = self.model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("head")]
        if missing:
            raise RuntimeError(f"ViT weights {path} lack {len(missing)} keys, e.g. {missing[:5]}")
        if result.unexpected_keys:
            logger.warning("ViT weights %s: %d unexpected keys ignored, e.g. %s", path,
                           len(result.unexpected_keys), result.unexpected_keys[:5])
        logger.info("loaded ViT weights from %s", path)

    def train(self, mode: bool = True):
        # A frozen ViT stays in eval mode (dropout/drop-path off) whatever the caller does.
        super().train(mode and not self.cfg.frozen)
        return self

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) in [-1, 1] → (n, l, d) patch tokens before the final norm."""
        size = self.cfg.img_size
        if frames.shape[-2:] != (size, size):
            frames = F.interpolate(frames, size=(size, size), mode="bicubic", align_corners=False,
                                   antialias=True)
        x = ((frames.float() + 1) / 2 - self.mean) / self.std
        # Inputs follow the weights (DeepSpeed bf16 casts the module, never its inputs).
        x = x.to(self.model.patch_embed.proj.weight.dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.frozen):
            m = self.model
            x = m.patch_embed(x)
            x = m._pos_embed(x)
            x = m.patch_drop(x)
            x = m.norm_pre(x)
            x = m.blocks(x)
        return x[:, m.num_prefix_tokens:]
