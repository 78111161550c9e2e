"""Factorized space-time video U-Net (Ho et al. 2022; DynamiCrafter-like sizes in ``paper``).

Each level stacks, per layer: a 2D ResNet block (frames as batch, diffusers
``ResnetBlock2D``), a temporal 1D convolution (pixels as batch), spatial
self-attention + cross-attention to the Divot context (frames as batch), and
temporal self-attention (pixels as batch), all with diffusers ``Attention``
(SDPA). Temporal layers end in a zero-initialised projection, so the network
starts as a per-frame image model (the VDM recipe). The time embedding is
computed **per frame**: ``timesteps`` may be (b,) or (b, f), and each frame's
ResNet blocks see their own noise level plus a learned frame-index embedding.

``cross_attention_locality`` (σ > 0, off by default) adds ``-dist²/(2σ²)`` to the
cross-attention logits between a query at (frame, y, x) and a context token at its cell of the
de-tokenizer's ``context_grid``, all in [0, 1] units: a query starts out reading the context
tokens at its own place (the same prior as the resamplers', divot/resampler.py).

Axes: b = batch, f = frames, c = channels, h, w = height, width, n = context tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from divot.resampler import grid_coords


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    # DESIGN.md §3: attention at the three deepest levels.
    attention_levels: tuple[bool, ...] = (False, True, True, True)
    layers_per_block: int = 2
    head_channels: int = 64
    cross_attention_dim: int = 1024
    norm_num_groups: int = 32
    ff_mult: int = 4
    num_frames: int = 16
    cross_attention_locality: float = 0.0  # σ of the locality prior; 0 = off (see the docstring)
    # Zero-initialise where the condition enters (cross-attention outputs, pooled-context
    # embedding), as ControlNet's zero convolutions: a random U-Net then adds no
    # condition-dependent noise, so nothing pushes the context towards a constant before the
    # U-Net has learnt to use it (docs/TOKENIZER_TRAINING.md, finding 9).
    condition_zero_init: bool = False


def sincos_2d(h: int, w: int, dim: int, device, dtype) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding (h·w, dim), as in MAE/DiT; any resolution."""
    quarter = dim // 4
    freqs = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / max(1, quarter)))
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                            torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
    parts = [f(c.reshape(-1, 1) * freqs) for c in (ys, xs) for f in (torch.sin, torch.cos)]
    emb = torch.cat(parts, dim=1)
    return F.pad(emb, (0, dim - emb.shape[1])).to(dtype)


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, mult: int):
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, dim * mult), nn.GELU(), nn.Linear(dim * mult, dim))


class SpatialTransformer(nn.Module):
    """Per-frame self-attention, cross-attention to the context, feed-forward (tokens = h·w)."""

    def __init__(self, c: int, heads: int, context_dim: int, groups: int, ff_mult: int,
                 locality: float = 0.0, context_coords: torch.Tensor | None = None):
        super().__init__()
        self.locality = locality
        if locality > 0:
            # (n, 3) cell centres of the context tokens; derived from the config, not saved.
            self.register_buffer("context_coords", context_coords, persistent=False)
        self.norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.proj_in = nn.Linear(c, c)
        self.norm1, self.norm2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.attn1 = Attention(c, heads=heads, dim_head=c // heads)
        self.attn2 = Attention(c, cross_attention_dim=context_dim, heads=heads, dim_head=c // heads)
        self.ff = FeedForward(c, ff_mult)
        self.proj_out = nn.Linear(c, c)

    def cross_bias(self, batch: int, f: int, h: int, w: int) -> torch.Tensor:
        """((b f), h·w, n) additive logits; diffusers repeats them over the heads."""
        where = grid_coords((f, h, w)).to(self.context_coords.device).reshape(f, h * w, 1, 3)
        dist2 = ((where - self.context_coords) ** 2).sum(-1)  # f, q, n
        return (-dist2 / (2 * self.locality ** 2)).repeat(batch, 1, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor, f: int = 1) -> torch.Tensor:
        h, w = x.shape[-2:]
        bias = self.cross_bias(x.shape[0] // f, f, h, w).to(x.dtype) if self.locality > 0 else None
        y = self.proj_in(rearrange(self.norm(x), "n c h w -> n (h w) c"))
        # Where each query sits: without it, cross-attention cannot put content at a place.
        y = y + sincos_2d(h, w, y.shape[-1], y.device, y.dtype)
        n = self.norm1(y)
        y = y + self.attn1(n)
        y = y + self.attn2(self.norm2(y), encoder_hidden_states=context, attention_mask=bias)
        y = self.proj_out(y + self.ff(y))
        return x + rearrange(y, "n (h w) c -> n c h w", h=h, w=w)


class TemporalConv(nn.Module):
    """GroupNorm → SiLU → Conv1d(k=3) over frames; zero-initialised residual."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.conv = nn.Conv1d(c, c, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor, f: int) -> torch.Tensor:
        h, w = x.shape[-2:]
        y = rearrange(F.silu(self.norm(x)), "(b f) c h w -> (b h w) c f", f=f)
        return x + rearrange(self.conv(y), "(b h w) c f -> (b f) c h w", h=h, w=w)


class TemporalTransformer(nn.Module):
    """Self-attention across frames at each pixel, with learned frame positions; zero-init output."""

    def __init__(self, c: int, heads: int, groups: int, ff_mult: int, num_frames: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.pos = nn.Parameter(torch.zeros(num_frames, c))
        self.norm1 = nn.LayerNorm(c)
        self.attn1 = Attention(c, heads=heads, dim_head=c // heads)
        self.ff = FeedForward(c, ff_mult)
        self.proj_out = nn.Linear(c, c)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, f: int) -> torch.Tensor:
        h, w = x.shape[-2:]
        y = rearrange(self.norm(x), "(b f) c h w -> (b h w) f c", f=f) + self.pos[:f]
        y = y + self.attn1(self.norm1(y))
        y = self.proj_out(y + self.ff(y))
        return x + rearrange(y, "(b h w) f c -> (b f) c h w", h=h, w=w)


class SpaceTimeLayer(nn.Module):
    """ResNet → temporal conv → (spatial + cross attention) → temporal attention."""

    def __init__(self, cin: int, cout: int, temb: int, cfg: UNetConfig, attention: bool,
                 context_coords: torch.Tensor | None = None):
        super().__init__()
        g, heads = cfg.norm_num_groups, max(1, cout // cfg.head_channels)
        self.resnet = ResnetBlock2D(in_channels=cin, out_channels=cout, temb_channels=temb, groups=g, eps=1e-6)
        self.temp_conv = TemporalConv(cout, g)
        self.attn = SpatialTransformer(cout, heads, cfg.cross_attention_dim, g, cfg.ff_mult,
                                       cfg.cross_attention_locality, context_coords) if attention else None
        self.temp_attn = TemporalTransformer(cout, heads, g, cfg.ff_mult, cfg.num_frames) if attention else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor, f: int) -> torch.Tensor:
        x = self.temp_conv(self.resnet(x, temb), f)
        if self.attn is not None:
            x = self.temp_attn(self.attn(x, context, f), f)
        return x


class VideoUNet(nn.Module):
    """(b, f, c, h, w) noisy frames + per-frame timesteps + context → (b, f, c, h, w) v-prediction."""

    def __init__(self, cfg: UNetConfig, context_grid: tuple[int, ...] | None = None):
        super().__init__()
        if len(cfg.attention_levels) != len(cfg.block_out_channels):
            raise ValueError("attention_levels needs one entry per entry of block_out_channels")
        coords = None
        if cfg.cross_attention_locality > 0:
            if context_grid is None or len(context_grid) != 3:
                raise ValueError("cross_attention_locality needs the (frames, h, w) context_grid of the context")
            coords = grid_coords(tuple(context_grid))
        layer = partial(SpaceTimeLayer, context_coords=coords)
        self.cfg = cfg
        self.gradient_checkpointing = False
        ch = cfg.block_out_channels
        temb = ch[0] * 4
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_proj = Timesteps(ch[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        self.frame_embedding = nn.Parameter(torch.zeros(cfg.num_frames, temb))
        # Pooled context joins the time embedding, so every ResNet block sees the condition
        # (VDM: "conditioning added in every residual block"), besides cross-attention.
        self.context_embedding = TimestepEmbedding(cfg.cross_attention_dim, temb)
        self.down, self.downsamplers, skip_ch = nn.ModuleList(), nn.ModuleList(), [ch[0]]
        cin = ch[0]
        for i, c in enumerate(ch):
            self.down.append(nn.ModuleList(layer(cin if j == 0 else c, c, temb, cfg, cfg.attention_levels[i])
                                           for j in range(cfg.layers_per_block)))
            skip_ch += [c] * cfg.layers_per_block
            cin = c
            last = i == len(ch) - 1
            self.downsamplers.append(nn.Identity() if last else Downsample2D(c, use_conv=True, out_channels=c))
            if not last:
                skip_ch.append(c)
        self.mid = nn.ModuleList([layer(ch[-1], ch[-1], temb, cfg, True), layer(ch[-1], ch[-1], temb, cfg, False)])
        self.up, self.upsamplers = nn.ModuleList(), nn.ModuleList()
        for i, c in reversed(list(enumerate(ch))):
            layers = nn.ModuleList()
            for _ in range(cfg.layers_per_block + 1):
                layers.append(layer(cin + skip_ch.pop(), c, temb, cfg, cfg.attention_levels[i]))
                cin = c
            self.up.append(layers)
            self.upsamplers.append(Upsample2D(c, use_conv=True, out_channels=c) if i > 0 else nn.Identity())
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # the untrained model predicts v = 0: a stable start
        nn.init.zeros_(self.conv_out.bias)
        if cfg.condition_zero_init:
            entries = [self.context_embedding.linear_2] + [m.attn2.to_out[0] for m in self.modules()
                                                            if isinstance(m, SpatialTransformer)]
            for linear in entries:
                nn.init.zeros_(linear.weight)
                nn.init.zeros_(linear.bias)

    def enable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = True

    def time_embed(self, timesteps: torch.Tensor, b: int, f: int, dtype: torch.dtype) -> torch.Tensor:
        """(b,) or (b, f) timesteps → ((b f), temb) with the frame-index embedding added."""
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(b)
        if timesteps.ndim == 1:
            timesteps = timesteps[:, None].expand(b, f)
        emb = self.time_embedding(self.time_proj(timesteps.reshape(-1)).to(dtype))
        return rearrange(rearrange(emb, "(b f) d -> b f d", b=b) + self.frame_embedding[:f].to(dtype),
                         "b f d -> (b f) d")

    def _run(self, layer: SpaceTimeLayer, x, temb, ctx, f):
        if self.gradient_checkpointing and self.training:
            return checkpoint(layer, x, temb, ctx, f, use_reentrant=False)
        return layer(x, temb, ctx, f)

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, f = sample.shape[:2]
        if f > self.cfg.num_frames:
            raise ValueError(f"{f} frames given; the U-Net was built for at most {self.cfg.num_frames}")
        # Inputs follow the weights (DeepSpeed bf16 casts the module, never its inputs).
        x = self.conv_in(rearrange(sample.to(self.conv_in.weight.dtype), "b f c h w -> (b f) c h w"))
        context = context.to(x.dtype)
        temb = self.time_embed(timesteps, b, f, x.dtype)
        temb = temb + self.context_embedding(context.mean(dim=1)).repeat_interleave(f, dim=0)
        ctx = context.repeat_interleave(f, dim=0)  # every frame attends to its clip's context
        skips = [x]
        for layers, down in zip(self.down, self.downsamplers):
            for layer in layers:
                x = self._run(layer, x, temb, ctx, f)
                skips.append(x)
            if not isinstance(down, nn.Identity):
                x = down(x)
                skips.append(x)
        for layer in self.mid:
            x = self._run(layer, x, temb, ctx, f)
        for layers, up in zip(self.up, self.upsamplers):
            for layer in layers:
                x = self._run(layer, torch.cat([x, skips.pop()], dim=1), temb, ctx, f)
            x = up(x)
        x = self.conv_out(F.silu(self.conv_norm_out(x)))
        return rearrange(x, "(b f) c h w -> b f c h w", b=b)
