"""Tokenizer + de-tokenizer as one object: clip → 64 tokens → clip.

A trained run directory holds ``tokenizer/`` and ``detokenizer/`` (each
``config.json`` + ``model.safetensors``); ``VideoAutoencoder.from_pretrained``
loads both and checks that they agree on the token shape.

Axes: b = batch, f = frames, n = tokens, d = token width.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from divot.detokenizer import DivotDetokenizer
from divot.modeling import CheckpointError
from divot.tokenizer import DivotTokenizer

logger = logging.getLogger(__name__)


class VideoAutoencoder(nn.Module):
    def __init__(self, tokenizer: DivotTokenizer, detokenizer: DivotDetokenizer):
        super().__init__()
        t, d = tokenizer.config, detokenizer.config
        if (t.num_tokens, t.token_dim) != (d.num_tokens, d.token_dim):
            raise CheckpointError(f"tokenizer makes {t.num_tokens}×{t.token_dim} tokens but the de-tokenizer "
                                  f"expects {d.num_tokens}×{d.token_dim}")
        # token_grid is written in both configs; it has to agree only where the de-tokenizer reads it.
        if d.uses_token_grid and tuple(t.token_grid) != tuple(d.token_grid):
            raise CheckpointError(f"tokenizer lays its tokens on {tuple(t.token_grid)} but the de-tokenizer "
                                  f"places them on token_grid {tuple(d.token_grid)}")
        self.tokenizer = tokenizer
        self.detokenizer = detokenizer

    @property
    def frame_size(self) -> int:
        return self.detokenizer.config.frame_size

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str = "cpu") -> "VideoAutoencoder":
        directory = Path(directory)
        missing = [p for p in ("tokenizer", "detokenizer") if not (directory / p / "config.json").is_file()]
        if missing:
            hint = ""
            if (directory / "checkpoints").is_dir():
                hint = " (the run has checkpoints but was not finished; resume it with --resume)"
            raise CheckpointError(f"{directory} lacks {', '.join(m + '/' for m in missing)}{hint}")
        model = cls(DivotTokenizer.from_pretrained(directory / "tokenizer", map_location),
                    DivotDetokenizer.from_pretrained(directory / "detokenizer", map_location))
        return model.eval()

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        self.tokenizer.save_pretrained(Path(directory) / "tokenizer")
        self.detokenizer.save_pretrained(Path(directory) / "detokenizer")

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """(b, f, 3, H, W) in [-1, 1] at ``frame_size`` → (b, n, d) Divot tokens."""
        return self.tokenizer(video)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.detokenizer.decode(tokens, **kwargs)

    @torch.no_grad()
    def reconstruct(self, video: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.decode(self.encode(video), **kwargs)
