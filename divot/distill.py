"""One-step de-tokenizer by adversarial distillation (SF-V, Zhang et al. 2024; DESIGN.md §6).

The generator G starts as a copy of the trained de-tokenizer. It is trained at a few
noise levels t (``generator_timesteps``; t = T−1 = 999 is pure noise under the zero
terminal SNR schedule, and is what inference uses): x_t = q_sample(x0, ε, t), one
evaluation gives v and x̂0 = x0_from_v(x_t, v, t). The discriminator D
(:mod:`divot.discriminator`) judges real x0 and generated x̂0 after both are noised again,
x'_t = q_sample(·, ε', t'), at a discriminator timestep t' drawn log-normal in the noise
scale σ = sqrt(1−ᾱ)/sqrt(ᾱ): ln σ ~ N(P_mean, P_std), mapped to the training timestep
with the nearest ln σ (the EDM training distribution, Karras et al. 2022; SF-V draws its
discriminator noise levels log-normal too).

Losses (hinge GAN, Lim & Ye 2017, as in SF-V), averaged over D's heads:

    L_D = E[relu(1 − D(x'_real))] + E[relu(1 + D(x̂'_fake))]
    L_G = −E[D(x̂'_fake)] + λ · d(x̂0, x0),   λ = ``recon_weight`` (SF-V: 0.1)

with the pseudo-Huber distance d(a, b) = sqrt(‖a − b‖² + c²) − c, the norm taken over a
whole clip (all of f, c, h, w), averaged over the batch. c = ``huber_c`` · sqrt(dim) with
dim the number of values per clip; the default coefficient 0.00054 is the one of improved
consistency training (Song & Dhariwal 2023, §3.3), chosen for data in [-1, 1], which is
what the pixel-space de-tokenizer sees (latents × 0.18215 are of the same order). With c
that small, d ≈ ‖a − b‖ (an L2 distance, not squared), so the term grows like
sqrt(dim) × RMS error; ``recon_weight`` sets the balance against the O(1) hinge term.

Everything here is a pure function; the only parameters live in the two modules passed in.

Axes: b = batch, f = frames, c = channels, h, w = height, width, n = context tokens,
d = context width.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from divot import diffusion
from divot.detokenizer import DivotDetokenizer
from divot.discriminator import Discriminator, frozen_parameters


@dataclass(frozen=True)
class DistillLossConfig:
    generator_timesteps: tuple[int, ...] = (999, 749, 499, 249)
    recon_weight: float = 0.1  # SF-V's λ for the pseudo-Huber reconstruction term
    huber_c: float = 0.00054  # c = huber_c · sqrt(values per clip) (iCT)
    d_log_sigma_mean: float = -1.2  # P_mean of ln σ for the discriminator's noise (EDM)
    d_log_sigma_std: float = 1.2  # P_std


def check_loss_config(cfg: DistillLossConfig, num_train_timesteps: int) -> None:
    """Raise ValueError naming the first bad field."""
    if not cfg.generator_timesteps:
        raise ValueError("loss.generator_timesteps is empty; give at least one, e.g. 999")
    bad = [t for t in cfg.generator_timesteps if not 0 <= t < num_train_timesteps]
    if bad:
        raise ValueError(f"loss.generator_timesteps {bad} outside [0, {num_train_timesteps - 1}]")
    if num_train_timesteps - 1 not in cfg.generator_timesteps:
        raise ValueError(f"loss.generator_timesteps must include {num_train_timesteps - 1}: inference starts "
                         "from pure noise there")
    if cfg.d_log_sigma_std <= 0:
        raise ValueError(f"loss.d_log_sigma_std must be > 0, got {cfg.d_log_sigma_std}")
    if cfg.recon_weight < 0 or cfg.huber_c <= 0:
        raise ValueError("loss.recon_weight must be ≥ 0 and loss.huber_c > 0")


# --------------------------------------------------------------------------- losses
def hinge_d_loss(real: Sequence[torch.Tensor], fake: Sequence[torch.Tensor]) -> torch.Tensor:
    """E[relu(1 − D(real))] + E[relu(1 + D(fake))], each expectation per head, heads averaged."""
    if len(real) != len(fake) or not real:
        raise ValueError(f"need the same, non-zero number of real and fake heads; got {len(real)} and {len(fake)}")
    terms = [F.relu(1 - r.float()).mean() + F.relu(1 + f.float()).mean() for r, f in zip(real, fake)]
    return torch.stack(terms).mean()


def hinge_g_loss(fake: Sequence[torch.Tensor]) -> torch.Tensor:
    """−E[D(fake)], per head, heads averaged."""
    if not fake:
        raise ValueError("no discriminator logits given")
    return torch.stack([-f.float().mean() for f in fake]).mean()


def huber_c(dim: int, coef: float = 0.00054) -> float:
    """c = coef · sqrt(dim) for data with ``dim`` values per sample (Song & Dhariwal 2023)."""
    return coef * math.sqrt(dim)


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """Mean over the batch (dim 0) of sqrt(‖a − b‖² + c²) − c, the norm over all other dims."""
    if a.shape != b.shape:
        raise ValueError(f"pseudo_huber: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    sq = (a.float() - b.float()).pow(2).flatten(1).sum(dim=1)
    return ((sq + c * c).sqrt() - c).mean()


# --------------------------------------------------------------------------- noise levels
def log_sigmas(acp: torch.Tensor) -> torch.Tensor:
    """ln σ_t = ½ (ln(1 − ᾱ_t) − ln ᾱ_t) for every training timestep (increasing in t)."""
    acp = acp.double()
    return (0.5 * (torch.log1p(-acp) - torch.log(acp))).float()


def sample_discriminator_timesteps(b: int, acp: torch.Tensor, mean: float, std: float,
                                   generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """(b,) timesteps whose ln σ is nearest to draws ln σ ~ N(mean, std)."""
    table = log_sigmas(acp).to(device)
    draw = mean + std * torch.randn(b, generator=generator, device=device)
    return (table[None, :] - draw[:, None]).abs().argmin(dim=1)


def sample_generator_timesteps(b: int, choices: Sequence[int], generator: torch.Generator | None = None,
                               device=None) -> torch.Tensor:
    """(b,) timesteps drawn uniformly from ``choices`` (one per clip)."""
    options = torch.tensor(list(choices), dtype=torch.long, device=device)
    return options[torch.randint(len(options), (b,), generator=generator, device=device)]


def _per_frame(t: torch.Tensor, f: int) -> torch.Tensor:
    return t[:, None].expand(-1, f).contiguous()


# --------------------------------------------------------------------------- the two steps
def generate_x0(gen: DivotDetokenizer, x0: torch.Tensor, tokens: torch.Tensor, t: torch.Tensor,
                noise: torch.Tensor | None = None) -> torch.Tensor:
    """G's one-evaluation x̂0 from x_t = q_sample(x0, ε, t) at per-clip timesteps ``t`` (b,)."""
    t = _per_frame(t, x0.shape[1])
    noise = torch.randn_like(x0) if noise is None else noise
    acp = gen.alphas_cumprod
    x_t = diffusion.q_sample(x0, noise, t, acp).to(x0.dtype)
    v = gen.predict_v(x_t, t, gen.context(tokens))
    return diffusion.x0_from_v(x_t, v, t, acp).to(x0.dtype)


def discriminate(disc: Discriminator, x0: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                 acp: torch.Tensor) -> list[torch.Tensor]:
    """D's logits (one tensor per head) for clean clips ``x0`` noised at per-clip ``t`` (b,)."""
    t = _per_frame(t, x0.shape[1])
    x_t = diffusion.q_sample(x0, torch.randn_like(x0), t, acp).to(x0.dtype)
    return list(disc(x_t, t, context).values())


def discriminator_loss(gen: DivotDetokenizer, disc: Discriminator, x0: torch.Tensor, tokens: torch.Tensor,
                       context: torch.Tensor, cfg: DistillLossConfig) -> tuple[torch.Tensor, dict]:
    """L_D on one batch; G runs without a graph, so only D's heads receive gradients."""
    b, acp = x0.shape[0], gen.alphas_cumprod
    with torch.no_grad():
        fake = generate_x0(gen, x0, tokens, sample_generator_timesteps(b, cfg.generator_timesteps, device=x0.device))
    t_d = sample_discriminator_timesteps(b, acp, cfg.d_log_sigma_mean, cfg.d_log_sigma_std, device=x0.device)
    # Real and fake of a clip share t' (D compares like with like) and go through D as one batch.
    both = discriminate(disc, torch.cat([x0, fake]), t_d.repeat(2), torch.cat([context, context]), acp)
    pairs = [x.chunk(2) for x in both]
    real_logits, fake_logits = [r for r, _ in pairs], [f for _, f in pairs]
    loss = hinge_d_loss(real_logits, fake_logits)
    logs = {"loss_d": loss.detach(), "d_real": torch.stack([r.detach().float().mean() for r in real_logits]).mean(),
            "d_fake": torch.stack([f.detach().float().mean() for f in fake_logits]).mean()}
    return loss, logs


def generator_loss(gen: DivotDetokenizer, disc: Discriminator, x0: torch.Tensor, tokens: torch.Tensor,
                   context: torch.Tensor, cfg: DistillLossConfig) -> tuple[torch.Tensor, dict]:
    """L_G on one batch; D's heads are held constant, so only G receives gradients."""
    b, acp = x0.shape[0], gen.alphas_cumprod
    fake = generate_x0(gen, x0, tokens, sample_generator_timesteps(b, cfg.generator_timesteps, device=x0.device))
    t_d = sample_discriminator_timesteps(b, acp, cfg.d_log_sigma_mean, cfg.d_log_sigma_std, device=x0.device)
    with frozen_parameters(disc.head_parameters()):
        adv = hinge_g_loss(discriminate(disc, fake, t_d, context, acp))
    recon = pseudo_huber(fake, x0, huber_c(x0[0].numel(), cfg.huber_c))
    loss = adv + cfg.recon_weight * recon
    return loss, {"loss_g": loss.detach(), "g_adv": adv.detach(), "g_recon": recon.detach()}
