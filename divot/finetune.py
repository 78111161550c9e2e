"""Temporal-only fine-tuning of the de-tokenizer: which parameters train, which stay frozen.

"Frame by Familiar Frame" (Rahman et al. 2024; DESIGN.md §6) finds that video diffusion
models replicate training videos, and that training only the *temporal* layers on top of
fixed spatial (image) weights replicates less, since the per-frame content model never sees
the video data. Here the spatial weights are the trained de-tokenizer's own: in
``temporal`` mode every de-tokenizer parameter is frozen except

* every :class:`~divot.unet.TemporalConv` (1D convolution across frames),
* every :class:`~divot.unet.TemporalTransformer` (attention across frames, with its learned
  frame positions ``pos``), and
* the U-Net's ``frame_embedding`` (the frame-index term of the per-frame time embedding),

i.e. everything that mixes or tells apart frames. The Perceiver resampler, the ResNet blocks,
the spatial/cross attention and the in/out convolutions stay as they are. The tokenizer is
frozen by the caller (the trainer). A frozen VAE (latent space) is never counted.

Axes (names only, no tensors reshaped here): f = frames, c = channels.
"""
from __future__ import annotations

import logging

from torch import nn

from divot.unet import TemporalConv, TemporalTransformer, VideoUNet

logger = logging.getLogger(__name__)

TRAINABLE_CHOICES = ("all", "temporal")
TEMPORAL_MODULES = (TemporalConv, TemporalTransformer)
TEMPORAL_PARAMETERS = ("frame_embedding",)  # U-Net parameters outside those modules


def check_trainable(mode: str) -> str:
    """``mode`` if it is a known choice, else a ValueError naming the choices."""
    if mode not in TRAINABLE_CHOICES:
        raise ValueError(f"detokenizer_trainable must be one of {TRAINABLE_CHOICES}, got {mode!r}")
    return mode


def temporal_parameter_names(unet: VideoUNet) -> list[str]:
    """Names (as in ``unet.named_parameters()``) of the U-Net's temporal parameters, in that order."""
    if not isinstance(unet, VideoUNet):
        raise TypeError(f"expected a VideoUNet, got {type(unet).__name__}")
    prefixes = tuple(f"{name}." for name, module in unet.named_modules() if isinstance(module, TEMPORAL_MODULES))
    return [name for name, _ in unet.named_parameters()
            if name in TEMPORAL_PARAMETERS or name.startswith(prefixes)]


def _own_parameters(detokenizer: nn.Module):
    """(name, parameter) of the de-tokenizer itself, without external frozen models (the VAE)."""
    external = tuple(getattr(detokenizer, "external_prefixes", ()))
    return [(n, p) for n, p in detokenizer.named_parameters() if not n.startswith(external)]


def freeze_all_but_temporal(detokenizer: nn.Module) -> tuple[int, int]:
    """Freeze every de-tokenizer parameter but the U-Net's temporal ones (``requires_grad``).

    Returns (trainable, total) parameter counts of the de-tokenizer (VAE excluded)."""
    unet = getattr(detokenizer, "unet", None)
    if not isinstance(unet, VideoUNet):
        raise TypeError(f"{type(detokenizer).__name__} has no VideoUNet `unet`; cannot select temporal layers")
    keep = {f"unet.{name}" for name in temporal_parameter_names(unet)}
    params = _own_parameters(detokenizer)
    for name, p in params:
        p.requires_grad_(name in keep)
    trainable = sum(p.numel() for name, p in params if name in keep)
    total = sum(p.numel() for _, p in params)
    logger.info("temporal-only de-tokenizer: %d of %d parameters trainable (%.1f%%, %d tensors)",
                trainable, total, 100.0 * trainable / max(1, total), len(keep))
    return trainable, total


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, external frozen models (the VAE) excluded."""
    params = _own_parameters(module)
    return sum(p.numel() for _, p in params if p.requires_grad), sum(p.numel() for _, p in params)
