"""SF-V discriminator: the frozen teacher U-Net encoder with trainable spatial and temporal heads.

SF-V (Zhang et al. 2024, §3 and Fig. 2; DESIGN.md §6) builds the discriminator of its
adversarial one-step distillation from the *encoder half* of the pretrained video U-Net,
kept frozen, and trains only small heads placed after each encoder block:

* **spatial heads** see each frame on its own (frames as batch): a 3×3 conv head on
  ((b f), c, h, w) gives one logit per frame position;
* **temporal heads** see each pixel's sequence of frames (pixels as batch): a Conv1d
  head (kernel 3 over frames) on ((b h w), c, f) gives one logit per pixel and frame.

Spatial heads alone cannot tell a still clip from a moving one (SF-V's ablation: the
generator then collapses to still frames); ``heads="spatial"`` reproduces that ablation.

Conditioning: every head is a *projection discriminator* (Miyato & Koyama 2018): besides
its unconditional logit, it adds the inner product of its hidden features with a linear
projection of the clip's pooled context (the teacher resampler's output averaged over
context tokens), scaled by 1/sqrt(width). The encoder itself also sees the context (its
cross-attention and its pooled-context embedding), exactly as in the teacher.

Inputs are noised clips x_t at a discriminator timestep (b, f); the caller noises
real and generated clips alike (``divot.distill``). Parameters are frozen only for the
encoder: gradients still flow *through* it to the input, which is how the generator learns.

Axes: b = batch, f = frames, c = channels, h, w = height, width, n = context tokens,
d = context width.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import torch
from einops import einsum, rearrange
from torch import nn

from divot.detokenizer import DivotDetokenizer

logger = logging.getLogger(__name__)

HEAD_KINDS = ("spatial+temporal", "spatial")


@dataclass(frozen=True)
class DiscriminatorConfig:
    heads: str = "spatial+temporal"  # "spatial" = SF-V's ablation (collapses to still frames)
    head_width: int | None = None  # hidden channels of every head; None = the encoder block's width
    conditioned: bool = True  # projection term on the pooled context


class Head(nn.Module):
    """norm → SiLU → conv(k=3) → norm → SiLU → conv(k=1) logit, plus the projection term.

    ``conv`` is ``nn.Conv2d`` (spatial head, input (N, c, h, w)) or ``nn.Conv1d`` (temporal
    head, input (N, c, f)); the output is (N, positions) logits.
    """

    def __init__(self, conv: type[nn.Module], channels: int, width: int, groups: int, cond_dim: int | None):
        super().__init__()
        self.body = nn.Sequential(nn.GroupNorm(groups, channels, eps=1e-6), nn.SiLU(),
                                  conv(channels, width, 3, padding=1), nn.GroupNorm(groups, width, eps=1e-6),
                                  nn.SiLU())
        self.out = conv(width, 1, 1)
        self.cond = nn.Linear(cond_dim, width) if cond_dim else None

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        h = self.body(x)
        logits = self.out(h).flatten(1)
        if self.cond is not None:
            # Projection discriminator: <φ(x), W·y> per position, y = pooled context.
            proj = einsum(h.flatten(2), self.cond(cond), "n c p, n c -> n p")
            logits = logits + proj / math.sqrt(h.shape[1])
        return logits


class _UNetInputTap(nn.Module):
    """Stands in for the U-Net inside the teacher's ``predict_v``: records the U-Net's input
    (after the teacher's own preparation: EDM input scaling, extra input channels, …) and
    returns zeros of the output's shape. Parameter-free."""

    def __init__(self, out_channels: int):
        super().__init__()
        self.out_channels = out_channels
        self.inputs: tuple | None = None

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        self.inputs = (sample, timesteps, context)
        b, f, _, h, w = sample.shape
        return sample.new_zeros(b, f, self.out_channels, h, w)


class Discriminator(nn.Module):
    """Frozen teacher encoder (+ the teacher's frozen input path) and trainable heads.

    The teacher is split in two frozen parts: ``front`` (the de-tokenizer with its U-Net
    replaced by a tap: resampler, EDM/v input preparation, any extra input channels) and
    ``encoder`` (its U-Net with the decoder half removed). So D always sees exactly what the
    teacher's U-Net saw, whatever the de-tokenizer does before its U-Net, and runs the
    U-Net's own ``forward`` up to the mid block; forward hooks collect each block's output.

    ``forward(x_t, timesteps, context)`` returns a dict of logits, one entry per head:
    ``spatial{i}`` of shape (b, f·h·w) ordered (f h w), and ``temporal{i}`` of shape
    (b, h·w·f) ordered (h w f); i counts the encoder blocks (each down level, then the mid block).
    """

    def __init__(self, teacher: DivotDetokenizer, config: DiscriminatorConfig = DiscriminatorConfig()):
        super().__init__()
        if config.heads not in HEAD_KINDS:
            raise ValueError(f"discriminator heads must be one of {HEAD_KINDS}, got {config.heads!r}")
        self.config = config
        unet = teacher.unet
        # D never runs the decoder half: drop it, so it is neither stored nor run (the U-Net's
        # forward then ends after its mid block).
        unet.up, unet.upsamplers = nn.ModuleList(), nn.ModuleList()
        unet.conv_norm_out, unet.conv_out = nn.Identity(), nn.Identity()
        teacher.unet = _UNetInputTap(unet.cfg.out_channels)
        teacher.vae = None  # D works in diffusion space; the generator owns the VAE
        self.front = teacher.requires_grad_(False)
        self.encoder = unet.requires_grad_(False)
        # Each down block ends in its downsampler; the last one's is an Identity the U-Net skips.
        ends = [layers[-1] if isinstance(down, nn.Identity) else down for layers, down in zip(unet.down,
                                                                                               unet.downsamplers)]
        self._features: list[torch.Tensor] = []
        for module in [*ends, unet.mid[-1]]:
            module.register_forward_hook(self._collect)
        ucfg = unet.cfg
        widths = list(ucfg.block_out_channels) + [ucfg.block_out_channels[-1]]  # down blocks, then mid
        cond_dim = teacher.config.context_dim if config.conditioned else None
        kinds = ("spatial", "temporal") if config.heads == "spatial+temporal" else ("spatial",)
        self.heads = nn.ModuleDict()
        for i, c in enumerate(widths):
            for kind in kinds:
                conv = nn.Conv2d if kind == "spatial" else nn.Conv1d
                self.heads[f"{kind}{i}"] = Head(conv, c, config.head_width or c, ucfg.norm_num_groups, cond_dim)

    def _collect(self, _module, _inputs, output) -> None:
        self._features.append(output)

    @torch.no_grad()
    def context(self, tokens: torch.Tensor) -> torch.Tensor:
        """The frozen teacher's cross-attention context (b, n, d) for Divot tokens."""
        return self.front.context(tokens)

    def unet_inputs(self, x_t: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> tuple:
        """(sample, timesteps, context) as the teacher hands them to its U-Net: its whole input
        path (EDM/v input scaling, extra input channels, …) run up to the U-Net."""
        tap = self.front.unet
        self.front.predict_v(x_t, timesteps, context)
        inputs, tap.inputs = tap.inputs, None
        return inputs

    def encode(self, sample: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> list[torch.Tensor]:
        """Output of each encoder block, ((b f), c, h, w), for U-Net inputs (:meth:`unet_inputs`):
        each down level (after its downsampler, as a diffusers down block) and the mid block."""
        self._features = []
        self.encoder(sample, timesteps, context)
        feats, self._features = self._features, []
        return feats

    def features(self, x_t: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> list[torch.Tensor]:
        """The encoder blocks' outputs (:meth:`encode`) for a noised clip ``x_t``."""
        return self.encode(*self.unet_inputs(x_t, timesteps, context))

    def classify(self, feats: list[torch.Tensor], context: torch.Tensor, f: int) -> dict[str, torch.Tensor]:
        """The heads' logits for encoder features (see the class docstring for shapes)."""
        b = context.shape[0]
        pooled = context.mean(dim=1) if self.config.conditioned else None
        logits = {}
        for i, feat in enumerate(feats):
            h, w = feat.shape[-2:]
            if f"spatial{i}" in self.heads:
                cond = None if pooled is None else pooled.repeat_interleave(f, dim=0)
                out = self.heads[f"spatial{i}"](feat, cond)  # ((b f), h·w)
                logits[f"spatial{i}"] = rearrange(out, "(b f) p -> b (f p)", b=b)
            if f"temporal{i}" in self.heads:
                seq = rearrange(feat, "(b f) c h w -> (b h w) c f", f=f)
                cond = None if pooled is None else pooled.repeat_interleave(h * w, dim=0)
                out = self.heads[f"temporal{i}"](seq, cond)  # ((b h w), f)
                logits[f"temporal{i}"] = rearrange(out, "(b p) f -> b (p f)", b=b)
        return logits

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.classify(self.features(x_t, timesteps, context), context, x_t.shape[1])

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.heads.parameters())


@contextlib.contextmanager
def frozen_parameters(params):
    """``requires_grad`` off for ``params`` inside the block, then back as it was. Used for D's
    heads in the generator's step (the adversarial loss then reaches G only) and, in training,
    for whichever group a phase does not update: a parameter frozen through the backward gets
    no gradient at all (torch leaves ``.grad`` None; DeepSpeed ZeRO fills in zeros rather than
    reusing its last gradient)."""
    params = list(params)
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, before):
            p.requires_grad_(flag)
