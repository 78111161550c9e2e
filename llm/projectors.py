"""The two MLPs between Divot tokens and the LLM's hidden size (DESIGN.md §4).

* :class:`InputProjector` (comprehension): Divot token d_tok → LLM hidden; its outputs replace
  the placeholder embeddings of each clip. Paper: 256 → 4096 → 4096.
* :class:`OutputProjector` (generation): last hidden state of a query token → the 2kd + k raw
  GMM parameters (see :mod:`llm.gmm`). Paper: 4096 → 8208 → 8208.

Both are ``proj = Sequential(Linear, GELU, Linear)`` so their keys are ``proj.0.*`` and
``proj.2.*``, matching the release's ``input_resampler.proj.{0,2}`` and
``output_resampler.proj.{0,2}`` after stripping the prefix.

Axes: ... = any leading axes (batch, tokens); the last axis is the feature width.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from divot.modeling import PretrainedMixin
from llm.gmm import NUM_COMPONENTS, gmm_out_dim

RELEASE_PREFIXES = {"InputProjector": "input_resampler.", "OutputProjector": "output_resampler."}


def _mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    # Indices 0 / 2 are the release's parameter names; 1 is the (parameter-free) GELU.
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


@dataclass(frozen=True)
class InputProjectorConfig:
    token_dim: int = 256
    hidden_size: int = 4096


class InputProjector(PretrainedMixin, nn.Module):
    """(..., token_dim) Divot tokens → (..., hidden_size) LLM input embeddings."""
    config_class = InputProjectorConfig

    def __init__(self, config: InputProjectorConfig):
        super().__init__()
        self.config = config
        self.proj = _mlp(config.token_dim, config.hidden_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(tokens)


@dataclass(frozen=True)
class OutputProjectorConfig:
    hidden_size: int = 4096
    token_dim: int = 256
    num_components: int = NUM_COMPONENTS

    @property
    def out_dim(self) -> int:
        return gmm_out_dim(self.num_components, self.token_dim)


class OutputProjector(PretrainedMixin, nn.Module):
    """(..., hidden_size) query hidden states → (..., 2kd + k) raw GMM parameters."""
    config_class = OutputProjectorConfig

    def __init__(self, config: OutputProjectorConfig):
        super().__init__()
        self.config = config
        self.proj = _mlp(config.hidden_size, config.out_dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden)


def from_release_state_dict(module: nn.Module, release_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This projector's entries of a release ``agent/pytorch_model.bin`` state dict, prefix removed."""
    prefix = RELEASE_PREFIXES[type(module).__name__]
    return {k[len(prefix):]: v for k, v in release_state.items() if k.startswith(prefix)}
