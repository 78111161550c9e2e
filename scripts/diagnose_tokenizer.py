"""Can the clip be read back from the tokens? Train a small read-out on them and watch.

    python scripts/diagnose_tokenizer.py                          # tiny tokenizer trained with the read-out
    python scripts/diagnose_tokenizer.py --freeze                 # random tokenizer held fixed
    python scripts/diagnose_tokenizer.py --freeze --locality 0.15,0.3,0.6,0
    python scripts/diagnose_tokenizer.py --tokenizer runs/tokenizer/tokenizer --freeze

A plain autoencoder, no diffusion: tokenizer → 64 tokens → read-out → the 5 tokenizer frames,
mean squared error on held-in Shapes training clips, AdamW. The read-out is either ``conv`` (the
tokens laid out on their ``token_grid`` (frames, h, w) as channels, then convolutions and
upsampling: a local map that is quick to learn) or ``attention`` (one learned query per frame
and 4×4-pixel cell, with a fixed sin-cos position, cross-attending to the tokens: the routing a
U-Net's cross-attention has to learn). Every ``--every`` steps it prints, on 32 validation clips:
the error, the error when each clip is read from another clip's tokens (equal = the tokens are
not used), the error of the best constant clip (the per-pixel mean) and the tokens' spread
across clips (≈ 0 = collapsed), and how often the probe reads each clip's colour, shape and
direction from the rebuilt frames (the probe on the true frames is printed first, as the
ceiling; finding 14). The last line is one JSON object. docs/TOKENIZER_TRAINING.md,
finding 8, has what it showed.

Axes: b = batch, f = frames, t/h/w = token grid, c = channels, d = token width.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from divot import presets
from divot.probe import agreement_rates, probe_clip
from divot.shapes import ShapesVideoDataset
from divot.tokenizer import DivotTokenizer
from divot.unet import sincos_2d


class ConvReadout(nn.Module):
    def __init__(self, grid: tuple[int, int, int], token_dim: int, frames: int, size: int, width: int = 96):
        super().__init__()
        self.grid, self.frames = grid, frames
        layers: list[nn.Module] = [nn.Conv2d(token_dim * grid[0], width, 3, padding=1)]
        for _ in range(int(math.log2(size // grid[1]))):
            layers += [nn.GroupNorm(8, width), nn.SiLU(), nn.Upsample(scale_factor=2),
                       nn.Conv2d(width, width, 3, padding=1)]
        layers += [nn.GroupNorm(8, width), nn.SiLU(), nn.Conv2d(width, 3 * frames, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t, h, w = self.grid
        x = rearrange(tokens, "b (t h w) d -> b (t d) h w", t=t, h=h, w=w)
        return rearrange(self.net(x), "b (f c) h w -> b f c h w", f=self.frames)


class AttentionReadout(nn.Module):
    def __init__(self, token_dim: int, frames: int, size: int, width: int = 128, depth: int = 2, cell: int = 4):
        super().__init__()
        self.frames, self.side, self.cell = frames, size // cell, cell
        where = sincos_2d(self.side, self.side, width, "cpu", torch.float32)
        self.queries = nn.Parameter(where.repeat(frames, 1) + 0.02 * torch.randn(frames * self.side ** 2, width))
        self.frame_embed = nn.Parameter(torch.randn(frames, 1, width) * 0.02)
        self.proj = nn.Linear(token_dim, width)
        self.layers = nn.ModuleList(nn.ModuleList([nn.LayerNorm(width), nn.MultiheadAttention(width, 4, batch_first=True),
                                                   nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width),
                                                                 nn.GELU(), nn.Linear(4 * width, width))])
                                    for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 3 * cell * cell))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        kv = self.proj(tokens)
        q = (rearrange(self.queries, "(f n) c -> f n c", f=self.frames) + self.frame_embed).flatten(0, 1)
        x = q.expand(tokens.shape[0], -1, -1)
        for norm, attn, ff in self.layers:
            x = x + attn(norm(x), kv, kv, need_weights=False)[0]
            x = x + ff(x)
        return rearrange(self.out(x), "b (f h w) (c p q) -> b f c (h p) (w q)", f=self.frames, h=self.side,
                         w=self.side, p=self.cell, q=self.cell)


def build_tokenizer(args) -> DivotTokenizer:
    if args.tokenizer:
        return DivotTokenizer.from_pretrained(args.tokenizer)
    overrides = {}
    if args.locality:
        sigmas = tuple(float(s) for s in args.locality.split(","))
        overrides = {"resampler_locality": sigmas, "resampler_heads": len(sigmas)}
    return DivotTokenizer(presets.tokenizer_config("tiny", **overrides))


def clips(ds, start: int, n: int, frames: list[int]) -> torch.Tensor:
    return torch.stack([ds[start + i]["video"] for i in range(n)])[:, frames]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", help="a saved tokenizer directory (default: a fresh tiny one)")
    p.add_argument("--freeze", action="store_true", help="hold the tokenizer fixed; train the read-out only")
    p.add_argument("--locality", help="comma-separated σ per resampler head (fresh tokenizer only)")
    p.add_argument("--readout", choices=("conv", "attention"), default="conv")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--tokenizer-lr", type=float, default=None,
                   help="the tokenizer's learning rate (default: --lr); lower keeps it from collapsing first")
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.tokenizer and args.locality:
        p.error("--locality builds a fresh tokenizer; it cannot change a saved one")
    torch.manual_seed(args.seed)
    tok = build_tokenizer(args)
    cfg, size = tok.config, tok.config.vit.img_size
    frames = list(cfg.frame_indices)
    readout = (ConvReadout(cfg.token_grid, cfg.token_dim, cfg.num_frames, size) if args.readout == "conv"
               else AttentionReadout(cfg.token_dim, cfg.num_frames, size))
    tok.requires_grad_(not args.freeze)
    tok_params = [q for q in tok.parameters() if q.requires_grad]
    params = list(readout.parameters()) + tok_params
    groups = [{"params": list(readout.parameters())}]
    if tok_params:
        groups.append({"params": tok_params, "lr": args.tokenizer_lr or args.lr})
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.01)
    train, val_ds = ShapesVideoDataset("train", size=size), ShapesVideoDataset("val", size=size)
    val = clips(val_ds, 0, 32, frames)
    truth = [val_ds.world.clip("val", i) for i in range(len(val))]
    mean_clip = ((val - val.mean(0, keepdim=True)) ** 2).mean().item()
    # What the probe reads on the true frames themselves: the ceiling of the read-out's score.
    ceiling = agreement_rates([probe_clip(v) for v in val], truth)
    print(f"best constant clip (per-pixel mean) {mean_clip:.4f}; probe on the true frames: colour "
          f"{ceiling['color']:.3f}, shape {ceiling['shape']:.3f}, direction {ceiling['direction']:.3f}; "
          f"{vars(args)}", flush=True)
    row, start = {}, time.time()
    for step in range(1, args.steps + 1):
        video = clips(train, (step - 1) * args.batch_size, args.batch_size, frames)
        loss = F.mse_loss(readout(tok(video)), video)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % args.every == 0 or step == args.steps:
            with torch.no_grad():
                tokens = tok(val)
                rebuilt = readout(tokens)
                read = agreement_rates([probe_clip(v) for v in rebuilt.clamp(-1, 1)], truth)
                row = {"step": step, "mse": F.mse_loss(rebuilt, val).item(),
                       "mse_other_clip_tokens": F.mse_loss(readout(tokens.roll(1, 0)), val).item(),
                       "mse_constant_clip": mean_clip, "token_spread": tokens.std(0).mean().item(),
                       **{f"probe_{a}": read[a] for a in ("color", "shape", "direction")},
                       "seconds": int(time.time() - start)}
            print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    main()
