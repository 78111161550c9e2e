"""Perceiver resampler (Flamingo style): a fixed set of learned latents reads an input set.

Used twice: in the tokenizer (125 space-time tokens → 64 Divot tokens, DESIGN.md §2.5)
and in the de-tokenizer (64 Divot tokens → 125 U-Net context tokens, §3).
Parameter names follow the official release (``latents``, ``proj_in``,
``layers.N.0.{norm1,norm2,to_q,to_kv,to_out}``, ``layers.N.1.{0,1,3}``, ``proj_out``,
``norm_out``) so a released state dict loads by renaming prefixes only.

An optional locality prior (``locality``, off by default and in ``paper``) gives the
inputs and the latents places on space-time grids and adds ``-dist²/(2σ²)`` to each
head's attention logits (σ per head, 0 = a global head), so that latent i starts out
reading the inputs near its own place. Without it a fresh resampler averages its whole
input and keeps almost nothing of where things are; with it, even a random tokenizer's
tokens can be read back (docs/TOKENIZER_TRAINING.md, finding 8).

Optional local queries (``local_queries``, off by default and in ``paper``): each latent starts
as its learned vector plus the (projected) input interpolated to the latent's place on the
grid, instead of the learned vector alone. A fresh resampler's attention is a weighted average,
which keeps what dominates the input's variance (where an object is, its colour) and loses the
small details (its shape: a read-out finds it in 97 % of clips in the resampler's input and in
73 % of its output; with local queries 93 %; ``scripts/probe_tokens.py``, finding 13). The queries then carry the local
input through the residual stream, and attention adds context to it.

Axes: b = batch, n = input tokens, l = latents, d = width, h = heads.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    # Indices 0 (norm), 1 (in), 3 (out) match the release; 2 is the activation.
    inner = dim * mult
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
                         nn.Linear(inner, dim, bias=False))


def grid_coords(grid: tuple[int, ...]) -> torch.Tensor:
    """Cell centres of a grid in [0, 1] per axis, row-major: (prod(grid), len(grid))."""
    axes = [(torch.arange(g, dtype=torch.float32) + 0.5) / g for g in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(grid))


def interpolate_grid(x: torch.Tensor, grid: tuple[int, ...], size: tuple[int, ...]) -> torch.Tensor:
    """(b, d, *size): tokens (b, n, d) laid row-major on ``grid`` (1 to 3 axes), interpolated
    (bi/trilinearly) to ``size``; cell centres align, as in :func:`grid_coords`."""
    if x.shape[1] != math.prod(grid):
        raise ValueError(f"grid {tuple(grid)} needs {math.prod(grid)} tokens, got {x.shape[1]}")
    axes = " ".join(f"g{i}" for i in range(len(grid)))
    cells = rearrange(x, f"b ({axes}) d -> b d {axes}", **{f"g{i}": g for i, g in enumerate(grid)})
    mode = ("linear", "bilinear", "trilinear")[len(grid) - 1]
    return F.interpolate(cells, size=tuple(size), mode=mode, align_corners=False)


def locality_bias(latent_grid: tuple[int, ...], input_grid: tuple[int, ...],
                  sigmas: tuple[float, ...]) -> torch.Tensor:
    """Additive attention logits (h, l, n + l) for keys [inputs; latents], the order of
    :class:`PerceiverAttention`: ``-dist²/(2σ²)`` per head, all zero where σ = 0."""
    if len(latent_grid) != len(input_grid):
        raise ValueError(f"latent grid {latent_grid} and input grid {input_grid} differ in rank")
    lat = grid_coords(latent_grid)
    keys = torch.cat([grid_coords(input_grid), lat])
    dist2 = ((lat[:, None] - keys[None]) ** 2).sum(-1)
    return torch.stack([-dist2 / (2 * s * s) if s > 0 else torch.zeros_like(dist2) for s in sigmas])


class PerceiverAttention(nn.Module):
    """Latents attend to [inputs; latents] (keys/values include the latents themselves)."""

    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8):
        super().__init__()
        self.heads = heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm1(x)
        latents = self.norm2(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype))
        return self.to_out(rearrange(out, "b h l d -> b l (h d)"))


class PerceiverResampler(nn.Module):
    """(b, n, input_dim) → (b, num_latents, output_dim).

    ``locality`` (one σ per head, in grid units; 0 = global) with ``input_grid`` and
    ``latent_grid`` (e.g. (frames, h, w)) turns on the locality prior of the module docstring.
    """

    def __init__(self, input_dim: int, dim: int, output_dim: int, num_latents: int,
                 depth: int, heads: int, dim_head: int = 64, ff_mult: int = 4,
                 locality: tuple[float, ...] = (), input_grid: tuple[int, ...] | None = None,
                 latent_grid: tuple[int, ...] | None = None, local_queries: bool = False):
        super().__init__()
        self.num_inputs = None
        if locality and (len(locality) != heads or any(s < 0 for s in locality)):
            raise ValueError(f"locality needs one σ >= 0 per head ({heads}), got {tuple(locality)}")
        if locality or local_queries:
            what = "locality" if locality else "local_queries"
            if input_grid is None or latent_grid is None or math.prod(latent_grid) != num_latents:
                raise ValueError(f"{what} needs input_grid and a latent_grid of {num_latents} cells, "
                                 f"got {input_grid} and {latent_grid}")
            if local_queries and not 1 <= len(input_grid) == len(latent_grid) <= 3:
                raise ValueError(f"local_queries needs input and latent grids of one rank (1 to 3), "
                                 f"got {input_grid} and {latent_grid}")
            self.num_inputs = math.prod(input_grid)
        self.input_grid = tuple(input_grid) if local_queries else None
        self.latent_grid = tuple(latent_grid) if local_queries else None
        if locality:
            # Derived from the config, so not saved: checkpoints stay loadable either way.
            self.register_buffer("attn_bias", locality_bias(tuple(latent_grid), tuple(input_grid),
                                                            tuple(locality))[None], persistent=False)
        self.latents = nn.Parameter(torch.randn(1, num_latents, dim) / dim ** 0.5)
        self.proj_in = nn.Linear(input_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), feed_forward(dim, ff_mult)])
            for _ in range(depth))

    def _local(self, x: torch.Tensor) -> torch.Tensor:
        """(b, l, d): the inputs (b, n, d), laid on ``input_grid``, interpolated to ``latent_grid``."""
        return interpolate_grid(x, self.input_grid, self.latent_grid).flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None
        if self.num_inputs is not None:
            if x.shape[1] != self.num_inputs:
                raise ValueError(f"resampler on an input grid expects {self.num_inputs} inputs, "
                                 f"got {x.shape[1]}")
            bias = getattr(self, "attn_bias", None)
        latents = self.latents.expand(x.shape[0], -1, -1)
        x = self.proj_in(x)
        if self.input_grid is not None:
            latents = latents + self._local(x)
        for attn, ff in self.layers:
            latents = attn(x, latents, bias) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))
