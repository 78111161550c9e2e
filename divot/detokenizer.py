"""The de-tokenizer: a video diffusion U-Net that rebuilds a clip from its Divot tokens (DESIGN.md §3).

Divot tokens (b, 64, token_dim) → Perceiver resampler → (b, context_tokens,
context_dim) cross-attention context → factorized space-time U-Net predicting v.
It works in one of two spaces:

* ``pixel`` (``tiny``): frames in [-1, 1], folded space-to-depth by ``pixel_patch``
  (32×32×3 with patch 4 → 8×8×48) so a CPU can train it in minutes.
* ``latent`` (``paper``): a frozen diffusers ``AutoencoderKL`` loaded from a local
  directory (never downloaded), 4 channels, scale 0.18215, decoded per frame.

Classifier-free guidance uses the tokens of an all-grey (zero) clip as the
unconditional input; they are kept in the ``null_tokens`` buffer, refreshed by
the trainer whenever the tokenizer changes.

Axes: b = batch, f = frames, c = channels, h, w = height, width, n = tokens, d = width.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
from einops import rearrange
from torch import nn

from divot import diffusion
from divot.modeling import PretrainedMixin
from divot.resampler import PerceiverResampler
from divot.unet import UNetConfig, VideoUNet

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DetokenizerConfig:
    token_dim: int = 256
    num_tokens: int = 64
    context_tokens: int = 125
    context_dim: int = 1024
    resampler_depth: int = 6
    resampler_heads: int = 16
    resampler_dim_head: int = 64
    num_frames: int = 16
    frame_size: int = 256
    space: str = "latent"  # "pixel" | "latent"
    pixel_patch: int = 1  # space-to-depth factor in pixel space
    vae_path: str | None = None  # local diffusers AutoencoderKL directory (latent space)
    vae_scale: float = 0.18215
    latent_channels: int = 4
    vae_downsample: int = 8
    unet: UNetConfig = field(default_factory=UNetConfig)
    noise: diffusion.NoiseConfig = field(default_factory=diffusion.NoiseConfig)

    @property
    def x_channels(self) -> int:
        return self.latent_channels if self.space == "latent" else 3 * self.pixel_patch ** 2

    @property
    def x_size(self) -> int:
        factor = self.vae_downsample if self.space == "latent" else self.pixel_patch
        return self.frame_size // factor


class DivotDetokenizer(PretrainedMixin, nn.Module):
    config_class = DetokenizerConfig
    # The VAE is its own frozen model, loaded from ``vae_path``; not saved with ours.
    external_prefixes = ("vae.",)

    def __init__(self, config: DetokenizerConfig):
        super().__init__()
        if config.noise.parameterization not in ("v", "edm"):
            raise ValueError(f"noise.parameterization must be 'v' or 'edm', got {config.noise.parameterization!r}")
        if config.space not in ("pixel", "latent"):
            raise ValueError(f"space must be 'pixel' or 'latent', got {config.space!r}")
        if config.unet.in_channels != config.x_channels or config.unet.out_channels != config.x_channels:
            raise ValueError(f"unet in/out channels must be {config.x_channels} for space={config.space}")
        self.config = config
        self.image_proj_model = PerceiverResampler(
            input_dim=config.token_dim, dim=config.context_dim, output_dim=config.context_dim,
            num_latents=config.context_tokens, depth=config.resampler_depth,
            heads=config.resampler_heads, dim_head=config.resampler_dim_head)
        self.unet = VideoUNet(config.unet)
        self.register_buffer("null_tokens", torch.zeros(1, config.num_tokens, config.token_dim))
        self.register_buffer("alphas_cumprod", diffusion.alphas_cumprod(config.noise), persistent=False)
        self.vae = self._load_vae() if config.space == "latent" and config.vae_path else None

    def _load_vae(self):
        from diffusers import AutoencoderKL
        vae = AutoencoderKL.from_pretrained(self.config.vae_path, local_files_only=True)
        vae.requires_grad_(False).eval()
        logger.info("loaded VAE from %s", self.config.vae_path)
        return vae

    # --- space conversion -------------------------------------------------------------
    def to_x(self, video: torch.Tensor) -> torch.Tensor:
        """Frames (b, f, 3, H, W) in [-1, 1] → diffusion space (b, f, c, h, w)."""
        cfg = self.config
        if cfg.space == "pixel":
            p = cfg.pixel_patch
            return rearrange(video, "b f c (h p1) (w p2) -> b f (c p1 p2) h w", p1=p, p2=p)
        if self.vae is None:
            raise RuntimeError("latent space needs a VAE: set vae_path to a local AutoencoderKL directory")
        b = video.shape[0]
        with torch.no_grad():
            z = self.vae.encode(rearrange(video, "b f c h w -> (b f) c h w").to(self.vae.dtype)).latent_dist.sample()
        return rearrange(z * cfg.vae_scale, "(b f) c h w -> b f c h w", b=b).float()

    def from_x(self, x: torch.Tensor) -> torch.Tensor:
        """Diffusion space → frames (b, f, 3, H, W) in [-1, 1]; the VAE decodes frame by frame."""
        cfg = self.config
        if cfg.space == "pixel":
            p = cfg.pixel_patch
            return rearrange(x, "b f (c p1 p2) h w -> b f c (h p1) (w p2)", p1=p, p2=p).clamp(-1, 1)
        frames = [self.vae.decode((x[:, i] / cfg.vae_scale).to(self.vae.dtype)).sample for i in range(x.shape[1])]
        return torch.stack(frames, dim=1).float().clamp(-1, 1)

    # --- model ------------------------------------------------------------------------
    def context(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.image_proj_model(tokens)

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """v-prediction for noisy ``x_t`` (b, f, c, h, w) at per-frame ``timesteps`` (b, f)."""
        return self.predict_v(x_t, timesteps, self.context(tokens))

    def _timesteps(self, timesteps: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        b, f = x_t.shape[:2]
        t = timesteps.to(x_t.device).long()
        return t.view(b, 1).expand(b, f) if t.ndim == 1 else t.expand(b, f) if t.ndim == 0 else t

    def predict_v(self, x_t: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """v for the sampler, whatever the network's own parameterization."""
        noise = self.config.noise
        if noise.parameterization == "v":
            return self.unet(x_t, timesteps, context)
        t = self._timesteps(timesteps, x_t)
        c_skip, c_out, c_in = diffusion.edm_coefficients(self.alphas_cumprod, t, x_t.ndim, noise.sigma_data)
        x0 = c_skip * x_t + c_out * self.unet(c_in * x_t, t, context)
        return diffusion.v_from_x0(x_t, x0, t, self.alphas_cumprod)

    def _loss(self, x_t, t, tokens, x0, noise) -> torch.Tensor:
        cfg = self.config.noise
        if cfg.parameterization == "v":
            return diffusion.v_loss(self(x_t, t, tokens), x0, noise, t, self.alphas_cumprod)
        # EDM: unit-variance target for the raw output, F* = (x0 − c_skip·x_t) / c_out.
        c_skip, c_out, c_in = diffusion.edm_coefficients(self.alphas_cumprod, t, x_t.ndim, cfg.sigma_data)
        raw = self.unet(c_in * x_t, t, self.context(tokens))
        return (raw.float() - (x0 - c_skip * x_t) / c_out).pow(2).mean()

    def training_loss(self, video: torch.Tensor, tokens: torch.Tensor, cond_dropout: float = 0.0,
                      per_frame_prob: float = 0.0, generator: torch.Generator | None = None,
                      timestep_shift: float = 1.0) -> torch.Tensor:
        """Denoising loss (v-MSE, DESIGN.md §3, or its EDM form); ``cond_dropout`` swaps tokens for
        the grey-clip tokens."""
        x0 = self.to_x(video)
        b, f = x0.shape[:2]
        if cond_dropout > 0:
            drop = torch.rand(b, 1, 1, device=tokens.device, generator=generator) < cond_dropout
            tokens = torch.where(drop, self.null_tokens.to(tokens.dtype).expand_as(tokens), tokens)
        t = diffusion.sample_timesteps(b, f, self.config.noise.num_train_timesteps, per_frame_prob,
                                       generator=generator, device=x0.device, shift=timestep_shift)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = diffusion.q_sample(x0, noise, t, self.alphas_cumprod)
        return self._loss(x_t, t, tokens, x0, noise)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, steps: int = 50, guidance_scale: float = 7.5,
               guidance_rescale: float = 0.7, sampler: str = "ddim", generator: torch.Generator | None = None,
               num_frames: int | None = None, callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Sample a clip (b, f, 3, H, W) in [-1, 1] from tokens (b, n, d) (DESIGN.md §3 defaults)."""
        cfg = self.config
        b, f = tokens.shape[0], num_frames or cfg.num_frames
        sched = diffusion.make_sampler(cfg.noise, sampler)
        sched.set_timesteps(steps, device=tokens.device)
        shape = (b, f, cfg.x_channels, cfg.x_size, cfg.x_size)
        x = torch.randn(shape, generator=generator, device=tokens.device) * sched.init_noise_sigma
        cond = self.context(tokens)
        # Stochastic samplers take the generator; deterministic ones (UniPC) have no such argument.
        step_kw = {"generator": generator} if "generator" in inspect.signature(sched.step).parameters else {}
        use_cfg = guidance_scale != 1.0
        if use_cfg:
            uncond = self.context(self.null_tokens.to(tokens.dtype).expand_as(tokens))
            cond = torch.cat([cond, uncond])
        for i, t in enumerate(sched.timesteps):
            x_in = sched.scale_model_input(x, t)
            x_in = torch.cat([x_in, x_in]) if use_cfg else x_in
            ts = torch.full(x_in.shape[:2], int(t), device=x.device, dtype=torch.long)
            v = self.predict_v(x_in, ts, cond)
            if use_cfg:
                v_c, v_u = v.chunk(2)
                v = diffusion.guided(v_c, v_u, guidance_scale, guidance_rescale)
            x = sched.step(v, t, x, **step_kw).prev_sample
            if callback is not None:
                callback(i + 1, steps)
        return self.from_x(x)

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        return type(state)((k, v) for k, v in state.items()
                           if not any(k.startswith(prefix + p) for p in self.external_prefixes))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if self.vae is not None:
            state_dict = dict(state_dict, **{"vae." + k: v for k, v in self.vae.state_dict().items()})
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
