"""The two MLPs between Divot tokens and the LLM's hidden size (DESIGN.md §4).

* :class:`InputProjector` (comprehension): Divot token d_tok → LLM hidden; its outputs replace
  the placeholder embeddings of each clip. Paper: 256 → 4096 → 4096. Optional (``token_mixing``,
  not in the paper; on in the ``tiny`` preset): before the MLP, each token gets a learned linear
  combination of its clip's tokens added, ``x_i + Σ_j M_ij x_j`` with M (n × n) starting at zero,
  so at initialisation it *is* the paper's projector. Why: a clip's motion is held *between* its
  tokens. On the default tiny tokenizer a linear read-out finds the direction in 0.996 of
  held-out clips from all 64 tokens flattened, in 0.286 from their mean (chance 0.2), and in
  0.972 from one learned combination ``Σ_j m_j x_j``; colour, in every token, in 1.000 from the
  mean (``python scripts/probe_tokens.py runs/tokenizer/tokenizer``). Without the mixing the
  2-layer LLM answered direction questions no better than without the video; with it, 0.89
  (docs/RESULTS.md, "Token mixing").
* :class:`OutputProjector` (generation): last hidden state of a query token → the 2kd + k raw
  GMM parameters (see :mod:`llm.gmm`). Paper: 4096 → 8208 → 8208. Optional (``feedback``, not
  in the paper; for ``LLMConfig.autoregressive_queries``): a linear map back from a Divot token
  to the hidden size, starting at zero, through which each query position reads the token drawn
  at the position before it (:meth:`llm.model.DivotLLM.forward`).

Both are ``proj = Sequential(Linear, GELU, Linear)`` so their keys are ``proj.0.*`` and
``proj.2.*``, matching the release's ``input_resampler.proj.{0,2}`` and
``output_resampler.proj.{0,2}`` after stripping the prefix.

Axes: ... = any leading axes (batch, tokens); the last axis is the feature width; c = clips,
n = tokens per clip, d = Divot token width.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import einsum
from torch import nn

from divot.modeling import PretrainedMixin
from llm.gmm import NUM_COMPONENTS, gmm_out_dim

RELEASE_PREFIXES = {"InputProjector": "input_resampler.", "OutputProjector": "output_resampler."}


def mix_tokens(x: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """``x_i + Σ_j M_ij x_j`` over the token axis of (..., n, d) whole clips."""
    n = mix.shape[0]
    if x.ndim < 2 or x.shape[-2] != n:
        raise ValueError(f"token mixing needs whole clips (..., {n}, d), got {tuple(x.shape)}")
    return x + einsum(mix.to(x.dtype), x, "i j, ... j d -> ... i d")


def _mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    # Indices 0 / 2 are the release's parameter names; 1 is the (parameter-free) GELU.
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


@dataclass(frozen=True)
class InputProjectorConfig:
    token_dim: int = 256
    hidden_size: int = 4096
    token_mixing: bool = False  # add Σ_j M_ij x_j across a clip's tokens first (not in the paper)
    num_tokens: int = 64        # tokens per clip; used only with token_mixing


class InputProjector(PretrainedMixin, nn.Module):
    """(..., token_dim) Divot tokens → (..., hidden_size) LLM input embeddings; with
    ``token_mixing`` the input must be whole clips, (c, n, token_dim)."""
    config_class = InputProjectorConfig

    def __init__(self, config: InputProjectorConfig):
        super().__init__()
        self.config = config
        self.proj = _mlp(config.token_dim, config.hidden_size)
        if config.token_mixing:
            # Zero start: the projector begins as the paper's per-token MLP.
            self.mix = nn.Parameter(torch.zeros(config.num_tokens, config.num_tokens))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.config.token_mixing:
            tokens = mix_tokens(tokens, self.mix)
        return self.proj(tokens)


@dataclass(frozen=True)
class OutputProjectorConfig:
    hidden_size: int = 4096
    token_dim: int = 256
    num_components: int = NUM_COMPONENTS
    feedback: bool = False  # token → hidden map for autoregressive query blocks (not in the paper)

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
        if config.feedback:
            # Zero start: an autoregressive block begins as the paper's parallel one, causal.
            self.feedback = nn.Linear(config.token_dim, config.hidden_size)
            nn.init.zeros_(self.feedback.weight)
            nn.init.zeros_(self.feedback.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden)

    def feed_back(self, tokens: torch.Tensor) -> torch.Tensor:
        """(..., n, d) tokens of whole query blocks → (..., n, h): position i gets token i − 1
        (position 0 gets the map of a zero token), so no position sees its own target."""
        if not self.config.feedback:
            raise RuntimeError("this output projector was built without feedback (autoregressive_queries=False)")
        shifted = torch.nn.functional.pad(tokens[..., :-1, :], (0, 0, 1, 0))
        return self.feedback(shifted.to(self.feedback.weight.dtype))


def from_release_state_dict(module: nn.Module, release_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This projector's entries of a release ``agent/pytorch_model.bin`` state dict, prefix removed."""
    prefix = RELEASE_PREFIXES[type(module).__name__]
    return {k[len(prefix):]: v for k, v in release_state.items() if k.startswith(prefix)}
