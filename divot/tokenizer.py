"""The Divot tokenizer: 5 frames of a 2-second clip → 64 continuous tokens (DESIGN.md §2).

ViT (frozen in ``paper``) → temporal encoder per patch position → adaptive 5×5 pool
per frame → LayerNorm → joint space-time ViT blocks with spatial + temporal
position embeddings → Perceiver resampler to ``num_tokens`` × ``token_dim``.
Submodule names follow the official release (``temporal_encoder``, ``norm``,
``image_proj_model.{pos_embed_spatial,pos_embed_temporal,blocks,norm,down_sampler}``)
so its state dict converts by prefix only.

Axes: b = batch, f = frames (5), l = ViT patches (gh·gw), s = pooled positions (p·p),
n = tokens, d = width.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.models.vision_transformer import Block
from torch import nn

from divot.modeling import PretrainedMixin
from divot.resampler import PerceiverResampler
from divot.vit import ViTConfig, ViTFeatures

TOKENIZER_FRAME_INDICES = (0, 4, 8, 12, 15)


@dataclass(frozen=True)
class TokenizerConfig:
    vit: ViTConfig = field(default_factory=ViTConfig)
    num_frames: int = 5
    temporal_width: int = 768
    temporal_depth: int = 6
    temporal_heads: int = 12
    hidden_size: int = 1024
    pool_size: int = 5
    st_depth: int = 4
    st_heads: int = 8
    resampler_depth: int = 6
    resampler_heads: int = 16
    resampler_dim_head: int = 64
    num_tokens: int = 64
    token_dim: int = 256
    frame_indices: tuple[int, ...] = TOKENIZER_FRAME_INDICES  # picked from 16-frame clips
    # Locality prior of the resampler (divot/resampler.py): one σ per resampler head, () = off.
    # The inputs sit on (num_frames, pool_size, pool_size), the tokens on token_grid.
    resampler_locality: tuple[float, ...] = ()
    # Latents start from the input at their place on token_grid (divot/resampler.py, finding 13).
    resampler_local_queries: bool = False
    token_grid: tuple[int, int, int] = (4, 4, 4)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm CLIP-style block (names ``attn``, ``ln_1``, ``mlp.c_fc``, ``mlp.c_proj``, ``ln_2``)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, width * 4))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(width * 4, width))
        # Zero the residual branches: the temporal encoder starts as a pass-through
        # (DESIGN.md §2.2), so early training sees clean per-frame ViT features.
        nn.init.zeros_(self.attn.out_proj.weight)
        nn.init.zeros_(self.attn.out_proj.bias)
        nn.init.zeros_(self.mlp.c_proj.weight)
        nn.init.zeros_(self.mlp.c_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class TemporalEncoder(nn.Module):
    """Attention across the f frames at each patch position: (B, f, d_vit) → (B, f, hidden)."""

    def __init__(self, input_dim: int, width: int, depth: int, heads: int, num_frames: int, output_dim: int):
        super().__init__()
        self.input_proj = nn.Linear(input_dim, width)
        self.positional_embedding = nn.Parameter(torch.zeros(num_frames, width))
        nn.init.normal_(self.positional_embedding, std=0.01)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(depth))
        self.ln_final = nn.LayerNorm(width)
        self.output_proj = nn.Linear(width, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_proj(x) + self.positional_embedding[: x.shape[1]]
        for block in self.transformer.resblocks:
            x = block(x)
        return self.output_proj(self.ln_final(x))


class SpaceTimeDown(nn.Module):
    """Joint space-time ViT blocks over the pooled tokens, then the Perceiver resampler."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        d = cfg.hidden_size
        self.pos_embed_spatial = nn.Parameter(torch.randn(cfg.pool_size ** 2, d) * 0.02)
        self.pos_embed_temporal = nn.Parameter(torch.randn(cfg.num_frames, d) * 0.02)
        self.blocks = nn.ModuleList(
            Block(d, cfg.st_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
            for _ in range(cfg.st_depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.down_sampler = PerceiverResampler(
            input_dim=d, dim=d, output_dim=cfg.token_dim, num_latents=cfg.num_tokens,
            depth=cfg.resampler_depth, heads=cfg.resampler_heads, dim_head=cfg.resampler_dim_head,
            locality=cfg.resampler_locality, input_grid=(cfg.num_frames, cfg.pool_size, cfg.pool_size),
            latent_grid=cfg.token_grid, local_queries=cfg.resampler_local_queries)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, f·s, d) → (b, num_tokens, token_dim)."""
        # Token (f, s) gets temporal[f] + spatial[s]; frames are the outer index.
        pos = rearrange(self.pos_embed_temporal, "f d -> f 1 d") + rearrange(self.pos_embed_spatial, "s d -> 1 s d")
        x = x + rearrange(pos, "f s d -> 1 (f s) d")[:, : x.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.down_sampler(self.norm(x))


class DivotTokenizer(PretrainedMixin, nn.Module):
    """Video clip → (b, num_tokens, token_dim) continuous Divot tokens."""

    config_class = TokenizerConfig

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.config = config
        self.vit = ViTFeatures(config.vit)
        self.temporal_encoder = TemporalEncoder(
            self.vit.width, config.temporal_width, config.temporal_depth, config.temporal_heads,
            config.num_frames, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size)
        self.image_proj_model = SpaceTimeDown(config)

    def select_frames(self, video: torch.Tensor) -> torch.Tensor:
        """(b, F, 3, H, W): F == num_frames passes through; a 16-frame clip gives frames 0,4,8,12,15."""
        f = video.shape[1]
        if f == self.config.num_frames:
            return video
        if max(self.config.frame_indices) >= f:
            raise ValueError(f"clip has {f} frames; tokenizer needs {self.config.num_frames} "
                             f"or at least {max(self.config.frame_indices) + 1}")
        return video[:, list(self.config.frame_indices)]

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """(b, F, 3, H, W) in [-1, 1] → (b, num_tokens, token_dim)."""
        video = self.select_frames(video)
        b, f = video.shape[:2]
        feats = self.vit(rearrange(video, "b f c h w -> (b f) c h w"))
        gh, gw = self.vit.grid
        x = rearrange(feats, "(b f) l d -> (b l) f d", b=b, f=f)
        x = self.temporal_encoder(x)
        x = rearrange(x, "(b gh gw) f d -> (b f) d gh gw", b=b, gh=gh, gw=gw)
        p = self.config.pool_size
        x = F.adaptive_avg_pool2d(x, (p, p))
        x = self.norm(rearrange(x, "(b f) d ph pw -> b (f ph pw) d", b=b, f=f))
        return self.image_proj_model(x)

    encode = forward
