"""Named model sizes: ``paper`` (DESIGN.md §2–3, published shapes) and ``tiny`` (CPU, minutes).

Presets are plain nested dicts so YAML files and CLI overrides merge into them
before they become frozen dataclasses (``divot.config.from_dict``).
"""
from __future__ import annotations

import copy
from typing import Any

from divot import config as cfglib
from divot.detokenizer import DetokenizerConfig
from divot.tokenizer import TokenizerConfig

TOKENIZER_PRESETS: dict[str, dict[str, Any]] = {
    # OpenCLIP ViT-H/14 features (1280-d, 16×16 patches), 64 × 256 tokens.
    "paper": {},
    # Same structure, small sizes; the ViT is trained from scratch (no weights offline).
    "tiny": {
        "vit": {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4, "embed_dim": 96,
                "depth": 2, "num_heads": 3, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "frozen": False},
        "temporal_width": 96, "temporal_depth": 1, "temporal_heads": 3, "hidden_size": 128,
        "pool_size": 4, "st_depth": 2, "st_heads": 4, "resampler_depth": 2, "resampler_heads": 4,
        "resampler_dim_head": 32, "num_tokens": 64, "token_dim": 32,
        # Locality prior (one σ per head; the last head global): token i starts out reading its
        # place of the (4, 4, 4) token grid, so even the random tokenizer's tokens keep where
        # things are (docs/TOKENIZER_TRAINING.md, findings 8 and 10).
        "resampler_locality": [0.15, 0.3, 0.6, 0.0], "token_grid": [4, 4, 4],
    },
}

DETOKENIZER_PRESETS: dict[str, dict[str, Any]] = {
    # DynamiCrafter-sized latent U-Net; vae_path must name a local AutoencoderKL directory.
    "paper": {},
    "tiny": {
        # No context resampler: trained from scratch it closes its input (findings 5, 9), so the
        # context is the 64 tokens, projected, on the tokenizer's grid (finding 10).
        "token_dim": 32, "context_tokens": 64, "context_grid": [4, 4, 4], "context_dim": 128,
        "resampler_depth": 0, "resampler_heads": 4, "resampler_dim_head": 32, "frame_size": 32,
        # Pixel space folded 2×2 (16×16×12 per frame): the top U-Net level sees the objects'
        # outlines, which a 4×4 fold (8×8×48) left to one linear layer per patch; the probe finds
        # the shape twice as often for ~1.4× the training time (docs/TOKENIZER_TRAINING.md, finding 17).
        "space": "pixel", "pixel_patch": 2,
        # A full-resolution head corrects x̂0 pixel by pixel: without it the U-Net leaves the
        # noise of low noise levels in every sample (divot/pixel_head.py, finding 11). It also
        # reads a dense map of the context, from which it learns the objects' colours (finding 12).
        "pixel_head_width": 64, "pixel_head_context": 32,
        # From-scratch CPU training: EDM preconditioning (samplers still see v; see diffusion.py).
        "noise": {"parameterization": "edm"},
        # 16×16 → 8×8 → 4×4 → 2×2 pyramid; attention only where it is cheap (4×4, 2×2). A level's
        # convolutions cost positions × channels²; 48 channels at the top level (where outlines are
        # drawn) gave probe agreement 0.44–0.48 in three runs against 0.30–0.42 for 32 (finding 17).
        "unet": {"in_channels": 12, "out_channels": 12, "block_out_channels": [48, 64, 64, 128],
                 "attention_levels": [False, False, True, True], "layers_per_block": 1, "head_channels": 32,
                 "cross_attention_dim": 128, "norm_num_groups": 8, "ff_mult": 2,
                 # Queries start out reading the context tokens at their own place; the condition
                 # enters through zero-initialised layers (finding 10).
                 "cross_attention_locality": 0.1, "condition_zero_init": True},
    },
}


def _get(table: dict, name: str, what: str) -> dict[str, Any]:
    if name not in table:
        raise ValueError(f"unknown {what} preset {name!r}; available: {sorted(table)}")
    return copy.deepcopy(table[name])


def tokenizer_config(preset: str = "tiny", **overrides) -> TokenizerConfig:
    return cfglib.from_dict(TokenizerConfig, cfglib.merge(_get(TOKENIZER_PRESETS, preset, "tokenizer"), overrides))


def detokenizer_config(preset: str = "tiny", **overrides) -> DetokenizerConfig:
    return cfglib.from_dict(DetokenizerConfig,
                            cfglib.merge(_get(DETOKENIZER_PRESETS, preset, "de-tokenizer"), overrides))
