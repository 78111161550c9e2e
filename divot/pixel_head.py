"""Full-resolution head for a space-to-depth pixel U-Net (the ``tiny`` de-tokenizer).

In pixel space the U-Net sees each p×p patch as 3·p² channels (32×32×3 with p = 4 → 8×8×48;
the ``tiny`` preset now folds by 2, 16×16×12: finding 17). At low noise the clean clip is the
noisy input with its per-pixel noise removed, and removing it takes one nonlinearity per pixel
value: with p = 4, 48 of them per position, more than a 64-channel first level learns in a CPU
budget. Its x̂0 then keeps most of the noise (v-loss ≈ 0.94 at t = 10), and every sample ends
in speckle (docs/TOKENIZER_TRAINING.md, finding 11).

This head corrects the U-Net's x̂0 one pixel at a time: per frame, a 3×3 convolution over
[x̂0, network input, noise level] at full resolution, then two per-pixel layers, whose output
is added to x̂0. It works on x̂0 rather than on the raw output (v, or EDM's F), because in x0
space the job ("snap each pixel back to a clean colour") has the same scale at every noise
level, where in F space it is the noise itself, scaled by 1/σ. Its last layer starts at zero,
so a fresh de-tokenizer is unchanged by it.

With ``context_channels`` > 0 the head also reads a dense map of the condition: the
de-tokenizer's context tokens sit on a (frames, h, w) grid, a linear layer maps each to
``context_channels`` values, and trilinear interpolation spreads them over every pixel of every
frame. The U-Net learns where an object is long before it learns which colour the tokens say
it has (finding 11): a pixel's colour is then a short, local function (brightness of x̂0 times
the colour its token names), which a per-pixel MLP learns in few steps (finding 12). The map is
smooth at the pixel scale (one grid cell spans 8 pixels in ``tiny``), so it enters through a
per-pixel linear layer, not the 3×3 convolution: nearly the same functions, at a fraction of
the cost. With this form and the per-pixel layers run channels-last as matrix products (faster
on CPU than 1×1 convolutions), a ``tiny`` stage-1 step went from 0.61 to 0.46 s
(``scripts/bench.py --only detokenizer_train --batch-size 4``; finding 15).

Axes: b = batch, f = frames, c = channels, h, w = patch grid (H, W: pixels), p = patch side,
n = context tokens, d = context width, k = context channels.
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from divot.resampler import interpolate_grid

# The context path's gain. A 3×3 kernel over a map that is smooth at the pixel scale acts as
# nine taps of nearly the same input, so Adam, which moves every weight by about the learning
# rate, moved that path about 3× (√9) faster than one per-pixel layer does. Without the gain
# the head learned to read colours from the map ~4× more slowly (development measurement with
# the colour task of tests/test_pixel_head.py, finding 15: error 0.38 of the blind head's after
# 250 steps, against 0.10 for the 3×3 form, which is no longer in the code, and 0.06 with the gain).
CONTEXT_GAIN = 3.0


class PixelHead(nn.Module):
    def __init__(self, patch: int, width: int, num_train_timesteps: int, context_dim: int = 0,
                 context_channels: int = 0, context_grid: tuple[int, int, int] | None = None):
        super().__init__()
        self.patch, self.scale = patch, 1.0 / num_train_timesteps
        self.context_grid = tuple(context_grid) if context_channels else None
        if context_channels and (context_dim <= 0 or self.context_grid is None or len(self.context_grid) != 3):
            raise ValueError("a pixel head with context_channels needs context_dim and a (frames, h, w) context_grid")
        self.context_proj = nn.Linear(context_dim, context_channels) if context_channels else None
        if self.context_proj is not None:
            # Zero at first, so the fresh head's hidden units answer to the pixels alone: denoising
            # (its first job) is not drowned by context channels that outnumber the pixel ones.
            nn.init.zeros_(self.context_proj.weight)
            nn.init.zeros_(self.context_proj.bias)
        # Inputs per pixel: 3 values of x̂0, 3 of the network input and the noise level t / T,
        # through a 3×3 convolution; the interpolated context map through a linear layer.
        self.pixel_in = nn.Conv2d(7, width, 3, padding=1)
        self.context_in = nn.Linear(context_channels, width, bias=False) if context_channels else None
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 3))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def _pixels(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch
        return rearrange(x, "b f (c p1 p2) h w -> (b f) c (h p1) (w p2)", p1=p, p2=p)

    def context_map(self, context: torch.Tensor, frames: int, size: tuple[int, int]) -> torch.Tensor:
        """((b f), H, W, k): the context tokens (b, n, d), laid on their grid, projected to k
        channels, scaled by :data:`CONTEXT_GAIN` and interpolated to every pixel (channels last)."""
        # The gain is applied on the tokens (b, n, k), before the linear interpolation and
        # ``context_in``, where it costs nothing: the same as scaling the per-pixel path.
        dense = interpolate_grid(CONTEXT_GAIN * self.context_proj(context), self.context_grid, (frames, *size))
        return rearrange(dense, "b k f h w -> (b f) h w k")

    def forward(self, x0: torch.Tensor, x_in: torch.Tensor, timesteps: torch.Tensor,
                context: torch.Tensor | None = None) -> torch.Tensor:
        """Corrected ``x0``; ``x0``, ``x_in``: (b, f, 3·p², h, w) estimate and network input;
        ``timesteps``: (b, f); ``context`` (b, n, d): the U-Net's context, read when the head has
        ``context_channels``."""
        b, f = x0.shape[:2]
        dtype = self.pixel_in.weight.dtype  # inputs follow the weights (DeepSpeed bf16 casts modules only)
        pix = self._pixels(x0.to(dtype))
        level = (timesteps.reshape(b * f, 1, 1, 1).to(dtype) * self.scale).expand(-1, 1, *pix.shape[-2:])
        hidden = rearrange(self.pixel_in(torch.cat([pix, self._pixels(x_in.to(dtype)), level], dim=1)),
                           "n c h w -> n h w c")
        if self.context_proj is not None:
            if context is None:
                raise ValueError("this pixel head reads the context: pass context")
            hidden = hidden + self.context_in(self.context_map(context.to(dtype), f, pix.shape[-2:]))
        p = self.patch
        res = rearrange(self.mlp(hidden), "(b f) (h p1) (w p2) c -> b f (c p1 p2) h w", b=b, p1=p, p2=p)
        return x0 + res.to(x0.dtype)


# Keys of the first layout (before finding 15): ``net`` = Conv2d 3×3 over [7 pixel inputs; k context
# channels], SiLU, Conv2d 1×1, SiLU, Conv2d 1×1.
_LEGACY = {"net.0.bias": "pixel_in.bias", "net.2.weight": "mlp.1.weight", "net.2.bias": "mlp.1.bias",
           "net.4.weight": "mlp.3.weight", "net.4.bias": "mlp.3.bias"}


def is_legacy_layout(keys, prefix: str) -> bool:
    """Whether weight names ``keys`` hold a pixel head (under ``prefix``) in the first layout."""
    return prefix + "net.0.weight" in keys


def upgrade_legacy_state(state: dict[str, torch.Tensor], prefix: str) -> bool:
    """Rewrite, in place, a pixel head's weights (keys under ``prefix``) from the first layout
    to this one; True if it found that layout. Pure apart from mutating ``state``.

    The 1×1 convolutions become linear layers exactly. The 3×3 kernel splits into its first
    seven input channels (``pixel_in``, exact) and the context channels, which become their
    sum over the nine taps divided by :data:`CONTEXT_GAIN`: exact where the context map is
    constant over a pixel's 3×3 neighbourhood, which trilinear interpolation over 8-pixel cells
    nearly is. A converted head is therefore close to, not identical with, the original.
    """
    if not is_legacy_layout(state, prefix):
        return False
    conv = state.pop(prefix + "net.0.weight")
    if conv.ndim != 4 or conv.shape[1] < 7 or conv.shape[-2:] != (3, 3):
        raise ValueError(f"{prefix}net.0.weight: expected (width, 7 + k, 3, 3), got {tuple(conv.shape)}")
    state[prefix + "pixel_in.weight"] = conv[:, :7].contiguous()
    if conv.shape[1] > 7:
        state[prefix + "context_in.weight"] = conv[:, 7:].sum(dim=(2, 3)) / CONTEXT_GAIN
    for old, new in _LEGACY.items():
        value = state.pop(prefix + old)
        state[prefix + new] = value.flatten(1) if value.ndim == 4 else value
    return True
