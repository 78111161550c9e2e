"""The GMM head: how Divot-LLM writes continuous Divot tokens (DESIGN.md §4).

Each generated token (d = 256 in the paper) is modelled as a mixture of k = 16 diagonal
Gaussians. The output projector emits, per token, a raw vector of 2kd + k numbers laid out
as in the official release (8208 = 2·16·256 + 16):

    raw[..., 0      : k·d  ]  means,          read as (k, d), component-major
    raw[..., k·d    : 2·k·d]  raw variances,  read as (k, d); variance = max(softplus(·), 1e-5)
    raw[..., 2·k·d  :      ]  mixture logits, (k,)

Loss: the mixture's negative log-likelihood divided by d, averaged over tokens.
Sampling: draw a component from softmax(logits / temperature), then draw from that Gaussian
with its variance multiplied by ``variance_scale`` (0.1 in the paper).

Axes: ... = any leading axes (batch, tokens), k = mixture components, d = token dim.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange, reduce

MIN_VARIANCE = 1e-5
NUM_COMPONENTS = 16
SAMPLE_MODES = ("sample", "mean", "mode")


class GMMParams(NamedTuple):
    means: torch.Tensor      # (..., k, d)
    variances: torch.Tensor  # (..., k, d), already positive
    logits: torch.Tensor     # (..., k)


def _acc(t: torch.Tensor) -> torch.Tensor:
    """At least fp32 (bf16 training would lose the NLL's precision); fp64 stays fp64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def gmm_out_dim(num_components: int, dim: int) -> int:
    return 2 * num_components * dim + num_components


def split_gmm_params(raw: torch.Tensor, num_components: int = NUM_COMPONENTS) -> GMMParams:
    """raw (..., 2kd + k) → means, variances (softplus, clamped ≥ 1e-5), logits."""
    k = num_components
    dim, rem = divmod(raw.shape[-1] - k, 2 * k)
    if rem or dim <= 0:
        raise ValueError(f"last axis {raw.shape[-1]} is not 2·k·d + k for k={k}")
    kd = k * dim
    means = rearrange(raw[..., :kd], "... (k d) -> ... k d", k=k)
    variances = F.softplus(rearrange(raw[..., kd:2 * kd], "... (k d) -> ... k d", k=k)).clamp(min=MIN_VARIANCE)
    return GMMParams(means, variances, raw[..., 2 * kd:])


def gmm_log_prob(params: GMMParams, target: torch.Tensor) -> torch.Tensor:
    """log p(target) under the mixture, per token: target (..., d) → (...). Computed in ≥ fp32."""
    means, variances, logits = (_acc(t) for t in params)
    x = rearrange(_acc(target), "... d -> ... 1 d")
    # log N(x; μ, diag σ²) = -½ Σ_d [log 2π + log σ² + (x-μ)²/σ²]
    per_dim = math.log(2 * math.pi) + variances.log() + (x - means).pow(2) / variances
    component = -0.5 * reduce(per_dim, "... k d -> ... k", "sum")
    return torch.logsumexp(F.log_softmax(logits, dim=-1) + component, dim=-1)


def gmm_nll(params: GMMParams, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over tokens of −log p(target) / d (DESIGN.md §4: "NLL divided by d").

    ``mask`` (...) optionally selects the tokens that count; the mean is over those.
    """
    nll = -gmm_log_prob(params, target) / target.shape[-1]
    if mask is None:
        return nll.mean()
    mask = mask.to(nll.dtype)
    return (nll * mask).sum() / mask.sum().clamp(min=1)


def gmm_mean(params: GMMParams, temperature: float = 1.0) -> torch.Tensor:
    """Mixture mean Σ_k softmax(logits/T)_k μ_k: (..., d)."""
    weights = torch.softmax(_acc(params.logits) / temperature, dim=-1)
    return torch.einsum("...k,...kd->...d", weights, _acc(params.means)).to(params.means.dtype)


def gmm_sample(params: GMMParams, generator: torch.Generator | None = None, variance_scale: float = 0.1,
               temperature: float = 1.0, mode: str = "sample") -> torch.Tensor:
    """Draw one token per mixture: (..., d).

    ``sample``: component ~ Categorical(softmax(logits / temperature)), then
    x ~ N(μ_c, variance_scale · σ²_c). ``mean``: the mixture mean (:func:`gmm_mean`).
    ``mode``: μ of the most probable component (the usual cheap stand-in for the mode).
    ``generator`` must live on the parameters' device.
    """
    if mode not in SAMPLE_MODES:
        raise ValueError(f"mode must be one of {SAMPLE_MODES}, got {mode!r}")
    if mode == "mean":
        return gmm_mean(params, temperature)
    means, variances, logits = params
    if mode == "mode":
        choice = logits.argmax(dim=-1)
    else:
        if temperature <= 0:
            raise ValueError("temperature must be > 0 for sampling; use mode='mode' for argmax")
        probs = torch.softmax(_acc(logits) / temperature, dim=-1)
        flat = rearrange(probs, "... k -> (...) k")
        choice = torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
    index = rearrange(choice, "... -> ... 1 1").expand(*choice.shape, 1, means.shape[-1])
    mu = means.gather(-2, index).squeeze(-2)
    if mode == "mode":
        return mu
    var = _acc(variances.gather(-2, index).squeeze(-2)) * variance_scale
    noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=var.dtype)
    return (_acc(mu) + var.sqrt() * noise).to(means.dtype)


@dataclass(frozen=True)
class GMMHead:
    """Parameter-free view of the head: which sizes, and the functions above bound to them."""
    num_components: int = NUM_COMPONENTS
    token_dim: int = 256

    @property
    def out_dim(self) -> int:
        return gmm_out_dim(self.num_components, self.token_dim)

    def split(self, raw: torch.Tensor) -> GMMParams:
        if raw.shape[-1] != self.out_dim:
            raise ValueError(f"expected last axis {self.out_dim} (k={self.num_components}, "
                             f"d={self.token_dim}), got {raw.shape[-1]}")
        return split_gmm_params(raw, self.num_components)

    def nll(self, raw: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return gmm_nll(self.split(raw), target, mask)

    def sample(self, raw: torch.Tensor, **kwargs) -> torch.Tensor:
        return gmm_sample(self.split(raw), **kwargs)
