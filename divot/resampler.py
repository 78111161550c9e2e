"""Perceiver resampler (Flamingo style): a fixed set of learned latents reads an input set.

Used twice: in the tokenizer (125 space-time tokens → 64 Divot tokens, DESIGN.md §2.5)
and in the de-tokenizer (64 Divot tokens → 125 U-Net context tokens, §3).
Parameter names follow the official release (``latents``, ``proj_in``,
``layers.N.0.{norm1,norm2,to_q,to_kv,to_out}``, ``layers.N.1.{0,1,3}``, ``proj_out``,
``norm_out``) so a released state dict loads by renaming prefixes only.

Axes: b = batch, n = input tokens, l = latents, d = width, h = heads.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    # Indices 0 (norm), 1 (in), 3 (out) match the release; 2 is the activation.
    inner = dim * mult
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
                         nn.Linear(inner, dim, bias=False))


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

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        latents = self.norm2(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(rearrange(out, "b h l d -> b l (h d)"))


class PerceiverResampler(nn.Module):
    """(b, n, input_dim) → (b, num_latents, output_dim)."""

    def __init__(self, input_dim: int, dim: int, output_dim: int, num_latents: int,
                 depth: int, heads: int, dim_head: int = 64, ff_mult: int = 4):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_latents, dim) / dim ** 0.5)
        self.proj_in = nn.Linear(input_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), feed_forward(dim, ff_mult)])
            for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latents = self.latents.expand(x.shape[0], -1, -1)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))
