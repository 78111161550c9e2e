"""Noise schedule, v-prediction targets and classifier-free guidance as pure functions.

DESIGN.md §3: 1000 steps, scaled-linear betas 0.00085→0.012 rescaled to zero
terminal SNR (Lin et al. 2024), v-prediction. Timesteps are per frame: ``t`` has
shape (b, f), so one clip may mix clean and noisy frames (the UniCon-style use in
a later issue); a shared timestep is simply ``t[:, :1].expand(b, f)``.

Axes: b = batch, f = frames, c = channels, h, w = height, width.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       EulerDiscreteScheduler, UniPCMultistepScheduler)

SAMPLERS = ("ddim", "dpm++", "unipc", "euler", "ddpm")


@dataclass(frozen=True)
class NoiseConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    rescale_zero_terminal_snr: bool = True
    prediction_type: str = "v_prediction"
    # How the network's raw output becomes v: "v" (the network predicts v, as in the paper)
    # or "edm" (Karras et al. 2022 preconditioning: x̂0 = c_skip·x_t + c_out·F(c_in·x_t),
    # then v from x̂0; the samplers still receive v). "edm" trains much faster from scratch.
    parameterization: str = "v"
    sigma_data: float = 0.5


def _common_kwargs(cfg: NoiseConfig) -> dict:
    return dict(num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start,
                beta_end=cfg.beta_end, beta_schedule=cfg.beta_schedule,
                prediction_type=cfg.prediction_type)


def alphas_cumprod(cfg: NoiseConfig) -> torch.Tensor:
    """ᾱ_t for t = 0..T-1, from diffusers' own beta construction (incl. the zero-SNR rescale)."""
    sched = DDPMScheduler(**_common_kwargs(cfg), rescale_betas_zero_snr=cfg.rescale_zero_terminal_snr)
    return sched.alphas_cumprod.clone().float()


def make_sampler(cfg: NoiseConfig, kind: str = "ddim"):
    """A diffusers scheduler for inference. Zero terminal SNR needs 'trailing' spacing
    so sampling starts at t = T-1 (pure noise) (Lin et al. 2024, §3.3)."""
    kw = dict(_common_kwargs(cfg), timestep_spacing="trailing")
    zsnr = cfg.rescale_zero_terminal_snr
    if kind == "ddim":
        return DDIMScheduler(**kw, rescale_betas_zero_snr=zsnr, clip_sample=False, set_alpha_to_one=True)
    if kind == "dpm++":
        # final_sigmas_type="zero" keeps the last step deterministic; with zero SNR the
        # first sigma is infinite, which DPM-Solver handles only via rescale support.
        return DPMSolverMultistepScheduler(**kw, rescale_betas_zero_snr=zsnr, algorithm_type="dpmsolver++",
                                           solver_order=2, final_sigmas_type="zero")
    if kind == "unipc":
        return UniPCMultistepScheduler(**kw, rescale_betas_zero_snr=zsnr, final_sigmas_type="zero")
    if kind == "euler":
        return EulerDiscreteScheduler(**kw, rescale_betas_zero_snr=zsnr, final_sigmas_type="zero")
    if kind == "ddpm":
        # Ancestral sampling (Ho et al. 2020): fresh noise at every step, the posterior's
        # variance between the strided timesteps.
        return DDPMScheduler(**kw, rescale_betas_zero_snr=zsnr, clip_sample=False)
    raise ValueError(f"unknown sampler {kind!r}; choose from {SAMPLERS}")


def timesteps_below(sched, init_t: int) -> torch.Tensor:
    """The timesteps of a set-up sampler at or below ``init_t``: those left when sampling
    starts from a clean input noised to ``init_t`` (SDEdit-style partial sampling)."""
    left = sched.timesteps[sched.timesteps <= init_t]
    if len(left) == 0:
        raise ValueError(f"init_t={init_t} lies below every sampler timestep {sched.timesteps.tolist()}")
    return left


def _gather(acp: torch.Tensor, t: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(ᾱ_t), sqrt(1-ᾱ_t) shaped (b, f, 1, …) to broadcast over (b, f, c, h, w)."""
    a = acp.to(t.device)[t].float()
    shape = tuple(t.shape) + (1,) * (ndim - t.ndim)
    return a.sqrt().view(shape), (1 - a).sqrt().view(shape)


def q_sample(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, acp: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(ᾱ_t) x_0 + sqrt(1-ᾱ_t) ε, with t of shape (b, f)."""
    sa, so = _gather(acp, t, x0.ndim)
    return sa * x0 + so * noise


def v_target(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, acp: torch.Tensor) -> torch.Tensor:
    """v = sqrt(ᾱ_t) ε − sqrt(1-ᾱ_t) x_0 (Salimans & Ho 2022)."""
    sa, so = _gather(acp, t, x0.ndim)
    return sa * noise - so * x0


def x0_from_v(xt: torch.Tensor, v: torch.Tensor, t: torch.Tensor, acp: torch.Tensor) -> torch.Tensor:
    """x_0 = sqrt(ᾱ_t) x_t − sqrt(1-ᾱ_t) v."""
    sa, so = _gather(acp, t, xt.ndim)
    return sa * xt - so * v


def _draw(shape, num_train_timesteps: int, shift: float, generator, device) -> torch.Tensor:
    """Timesteps with SD3's shift (Esser et al. 2024, eq. 23): u ↦ s·u / (1 + (s−1)·u).
    s = 1 is uniform; s > 1 spends more steps at high noise, where only the condition
    tells the model what to draw, so conditioning is learned sooner."""
    u = torch.rand(shape, generator=generator, device=device)
    if shift != 1.0:
        u = shift * u / (1 + (shift - 1) * u)
    return (u * num_train_timesteps).long().clamp_(0, num_train_timesteps - 1)


def edm_coefficients(acp: torch.Tensor, t: torch.Tensor, ndim: int, sigma_data: float):
    """EDM's c_skip, c_out, c_in rewritten for x_t = s·x0 + σ·ε (s = sqrt(ᾱ), σ = sqrt(1−ᾱ)).

    EDM works on x = x_t/s with noise level σ/s; multiplying through by s keeps every
    coefficient finite at zero terminal SNR (s = 0): c_skip = σd²·s/D², c_out = σ·σd/D,
    c_in = 1/D with D² = σ² + s²·σd². At s = 0 the model output alone is x̂0 (= σd·F).
    """
    s, sig = _gather(acp, t, ndim)
    d = (sig ** 2 + s ** 2 * sigma_data ** 2).sqrt()
    return sigma_data ** 2 * s / d ** 2, sig * sigma_data / d, 1 / d


def v_from_x0(xt: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, acp: torch.Tensor) -> torch.Tensor:
    """v = (sqrt(ᾱ) x_t − x_0) / sqrt(1−ᾱ) (σ ≥ sqrt(β_0) > 0, so this never divides by 0)."""
    s, sig = _gather(acp, t, xt.ndim)
    return (s * xt - x0) / sig


def sample_timesteps(b: int, f: int, num_train_timesteps: int, per_frame_prob: float = 0.0,
                     generator: torch.Generator | None = None, device=None, shift: float = 1.0) -> torch.Tensor:
    """(b, f) training timesteps: shared per clip, or (with ``per_frame_prob``) independent per frame."""
    shared = _draw((b, 1), num_train_timesteps, shift, generator, device).expand(b, f)
    if per_frame_prob <= 0:
        return shared.contiguous()
    independent = _draw((b, f), num_train_timesteps, shift, generator, device)
    pick = torch.rand(b, 1, generator=generator, device=device) < per_frame_prob
    return torch.where(pick, independent, shared)


def v_loss(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
           acp: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error against the v target; ``frame_mask`` (b, f) restricts it to some frames."""
    err = (pred.float() - v_target(x0, noise, t, acp)).pow(2).mean(dim=tuple(range(2, x0.ndim)))
    if frame_mask is None:
        return err.mean()
    m = frame_mask.float()
    return (err * m).sum() / m.sum().clamp_min(1.0)


def guided(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float, rescale: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance with guidance rescale φ (Lin et al. 2024, Alg. 2):
    v_cfg = v_u + s (v_c − v_u); v = φ · v_cfg · std(v_c)/std(v_cfg) + (1 − φ) · v_cfg."""
    v = v_uncond + scale * (v_cond - v_uncond)
    if rescale > 0:
        dims = tuple(range(1, v.ndim))
        ratio = v_cond.std(dim=dims, keepdim=True) / v.std(dim=dims, keepdim=True).clamp_min(1e-8)
        v = rescale * (v * ratio) + (1 - rescale) * v
    return v
