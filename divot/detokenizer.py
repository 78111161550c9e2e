"""The de-tokenizer: a video diffusion U-Net that rebuilds a clip from its Divot tokens (DESIGN.md §3).

Divot tokens (b, 64, token_dim) → Perceiver resampler → (b, context_tokens,
context_dim) cross-attention context → factorized space-time U-Net predicting v.
It works in one of two spaces:

* ``pixel`` (``tiny``): frames in [-1, 1], folded space-to-depth by ``pixel_patch``
  (32×32×3 with patch 2 → 16×16×12) so a CPU can train it in minutes.
* ``latent`` (``paper``): a frozen diffusers ``AutoencoderKL`` loaded from a local
  directory (never downloaded), 4 channels, scale 0.18215, decoded per frame.

Classifier-free guidance uses the tokens of an all-grey (zero) clip as the
unconditional input; they are kept in the ``null_tokens`` buffer, refreshed by
the trainer whenever the tokenizer changes.

Axes: b = batch, f = frames, c = channels, h, w = height, width, n = tokens, d = width.
"""
from __future__ import annotations

import functools
import inspect
import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from einops import rearrange
from torch import nn

from divot import conditioning, diffusion
from divot.modeling import PretrainedMixin
from divot.pixel_head import PixelHead, upgrade_legacy_state
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
    # Locality prior of the context resampler (divot/resampler.py): one σ per head, () = off.
    # token_grid must be the tokenizer's; context_grid holds context_tokens cells.
    resampler_locality: tuple[float, ...] = ()
    token_grid: tuple[int, int, int] = (4, 4, 4)
    context_grid: tuple[int, int, int] = (5, 5, 5)
    num_frames: int = 16
    frame_size: int = 256
    space: str = "latent"  # "pixel" | "latent"
    pixel_patch: int = 1  # space-to-depth factor in pixel space
    vae_path: str | None = None  # local diffusers AutoencoderKL directory (latent space)
    vae_scale: float = 0.18215
    latent_channels: int = 4
    vae_downsample: int = 8
    vae_decode_batch: int = 16  # frames per VAE decoder call (bounds its activation memory)
    # Pixel space only: width of a full-resolution head after the U-Net (divot/pixel_head.py);
    # 0 = none. It lets a space-to-depth U-Net remove per-pixel noise at low noise levels.
    pixel_head_width: int = 0
    # Channels of the dense context map the pixel head reads (0 = none); the context tokens must
    # lie on context_grid (divot/pixel_head.py).
    pixel_head_context: int = 0
    unet: UNetConfig = field(default_factory=UNetConfig)
    noise: diffusion.NoiseConfig = field(default_factory=diffusion.NoiseConfig)
    # A distilled one-step generator (training/distill_detokenizer.py, after SF-V): decode()
    # then always runs one evaluation from pure noise, without classifier-free guidance.
    one_step: bool = False

    @property
    def x_channels(self) -> int:
        return self.latent_channels if self.space == "latent" else 3 * self.pixel_patch ** 2

    @property
    def uses_token_grid(self) -> bool:
        """Whether where the tokens sit matters: the resampler's locality prior reads token_grid,
        and without a resampler the U-Net's cross-attention prior and the pixel head's context
        map place the tokens on it."""
        places = self.unet.cross_attention_locality > 0 or self.pixel_head_context > 0
        return bool(self.resampler_locality) or (self.resampler_depth == 0 and places)

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
        uses_grid = (bool(config.resampler_locality) or config.unet.cross_attention_locality > 0
                     or config.pixel_head_context > 0)
        if uses_grid and math.prod(config.context_grid) != config.context_tokens:
            raise ValueError(f"context_grid {tuple(config.context_grid)} must hold the {config.context_tokens} "
                             f"context tokens")
        self.config = config
        if config.resampler_depth == 0:
            # No resampler: the context is the tokens, projected (then context_tokens == num_tokens
            # and the U-Net's cross-attention prior places them on the token grid).
            if config.context_tokens != config.num_tokens or tuple(config.context_grid) != tuple(config.token_grid):
                raise ValueError("resampler_depth=0 needs context_tokens == num_tokens and context_grid == token_grid")
            self.image_proj_model = nn.Linear(config.token_dim, config.context_dim)
        else:
            self.image_proj_model = PerceiverResampler(
                input_dim=config.token_dim, dim=config.context_dim, output_dim=config.context_dim,
                num_latents=config.context_tokens, depth=config.resampler_depth,
                heads=config.resampler_heads, dim_head=config.resampler_dim_head,
                locality=config.resampler_locality, input_grid=config.token_grid,
                latent_grid=config.context_grid)
        self.unet = VideoUNet(config.unet, context_grid=config.context_grid)
        if config.pixel_head_width and config.space != "pixel":
            raise ValueError("pixel_head_width needs space='pixel'")
        if config.pixel_head_context and not config.pixel_head_width:
            raise ValueError("pixel_head_context needs a pixel head (pixel_head_width > 0)")
        self.pixel_head = (PixelHead(config.pixel_patch, config.pixel_head_width, config.noise.num_train_timesteps,
                                     config.context_dim, config.pixel_head_context, config.context_grid)
                           if config.pixel_head_width else None)
        self.register_buffer("null_tokens", torch.zeros(1, config.num_tokens, config.token_dim))
        self.register_buffer("alphas_cumprod", diffusion.alphas_cumprod(config.noise), persistent=False)
        self.vae = self._load_vae() if config.space == "latent" and config.vae_path else None
        self.register_state_dict_post_hook(self._drop_external_keys)
        self.register_load_state_dict_post_hook(self._forgive_external_missing)

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
        """Diffusion space → frames (b, f, 3, H, W) in [-1, 1]. The image VAE decodes each frame
        on its own; ``vae_decode_batch`` frames (of any clips) go through it per call."""
        cfg = self.config
        if cfg.space == "pixel":
            p = cfg.pixel_patch
            return rearrange(x, "b f (c p1 p2) h w -> b f c (h p1) (w p2)", p1=p, p2=p).clamp(-1, 1)
        z = rearrange(x / cfg.vae_scale, "b f c h w -> (b f) c h w").to(self.vae.dtype)
        frames = torch.cat([self.vae.decode(chunk).sample for chunk in z.split(cfg.vae_decode_batch)])
        return rearrange(frames, "(b f) c h w -> b f c h w", b=x.shape[0]).float().clamp(-1, 1)

    # --- model ------------------------------------------------------------------------
    def context(self, tokens: torch.Tensor) -> torch.Tensor:
        dtype = next(self.image_proj_model.parameters()).dtype
        return self.image_proj_model(tokens.to(dtype))

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """v-prediction for noisy ``x_t`` (b, f, c, h, w) at per-frame ``timesteps`` (b, f)."""
        return self.predict_v(x_t, timesteps, self.context(tokens))

    def _timesteps(self, timesteps: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        b, f = x_t.shape[:2]
        t = timesteps.to(x_t.device).long()
        return t.view(b, 1).expand(b, f) if t.ndim == 1 else t.expand(b, f) if t.ndim == 0 else t

    def network(self, x_t: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The raw output (v, or EDM's F) for noisy ``x_t``, with the pixel head's correction of
        x̂0 (divot/pixel_head.py) folded in when there is one."""
        noise, acp = self.config.noise, self.alphas_cumprod
        t = self._timesteps(timesteps, x_t)
        if noise.parameterization == "v":
            v = self.unet(x_t, t, context)
            if self.pixel_head is None:
                return v
            x0 = self.pixel_head(diffusion.x0_from_v(x_t, v, t, acp), x_t, t, context)
            return diffusion.v_from_x0(x_t, x0, t, acp)
        if self.pixel_head is None:
            _, _, c_in = diffusion.edm_coefficients(acp, t, x_t.ndim, noise.sigma_data)
            return self.unet(c_in * x_t, t, context)
        x0, c_skip, c_out = self._edm_x0(x_t, t, context)
        return (x0 - c_skip * x_t) / c_out

    def _edm_x0(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor):
        """EDM (t already (b, f)): x̂0 = c_skip·x_t + c_out·F(c_in·x_t), corrected by the pixel head
        when there is one; returned with c_skip and c_out, computed once."""
        c_skip, c_out, c_in = diffusion.edm_coefficients(self.alphas_cumprod, t, x_t.ndim,
                                                         self.config.noise.sigma_data)
        x_in = c_in * x_t
        x0 = c_skip * x_t + c_out * self.unet(x_in, t, context)
        if self.pixel_head is not None:
            x0 = self.pixel_head(x0, x_in, t, context)
        return x0, c_skip, c_out

    def predict_v(self, x_t: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """v for the sampler, whatever the network's own parameterization."""
        if self.config.noise.parameterization == "v":
            return self.network(x_t, timesteps, context)
        t = self._timesteps(timesteps, x_t)
        return diffusion.v_from_x0(x_t, self._edm_x0(x_t, t, context)[0], t, self.alphas_cumprod)

    def _loss(self, x_t, t, tokens, x0, noise, frame_mask=None) -> torch.Tensor:
        cfg = self.config.noise
        context = self.context(tokens)
        if cfg.parameterization == "v":
            return diffusion.v_loss(self.predict_v(x_t, t, context), x0, noise, t, self.alphas_cumprod, frame_mask)
        # EDM: unit-variance target for the raw output, F* = (x0 − c_skip·x_t) / c_out, so
        # F − F* = (x̂0 − x0) / c_out.
        x0_hat, _, c_out = self._edm_x0(x_t, t, context)
        return conditioning.masked_frame_mean(((x0_hat.float() - x0) / c_out).pow(2), frame_mask)

    def training_loss(self, video: torch.Tensor, tokens: torch.Tensor, cond_dropout: float = 0.0,
                      per_frame_prob: float = 0.0, generator: torch.Generator | None = None,
                      timestep_shift: float = 1.0, known_frames_prob: float = 0.0,
                      task_mix: conditioning.TaskMix | None = None,
                      known_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Denoising loss (v-MSE, DESIGN.md §3, or its EDM form); ``cond_dropout`` swaps tokens for
        the grey-clip tokens. Known frames (UniCon, DESIGN.md §6): a share ``known_frames_prob``
        of clips gets a task mask from ``task_mix`` (or ``known_mask`` (b, f) is used as given);
        known frames enter clean at timestep 0 and are left out of the loss."""
        x0 = self.to_x(video)
        b, f = x0.shape[:2]
        if cond_dropout > 0:
            drop = torch.rand(b, 1, 1, device=tokens.device, generator=generator) < cond_dropout
            tokens = torch.where(drop, self.null_tokens.to(tokens.dtype).expand_as(tokens), tokens)
        t = diffusion.sample_timesteps(b, f, self.config.noise.num_train_timesteps, per_frame_prob,
                                       generator=generator, device=x0.device, shift=timestep_shift)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = diffusion.q_sample(x0, noise, t, self.alphas_cumprod)
        if known_mask is None and known_frames_prob > 0:
            known_mask = conditioning.draw_task_masks(b, f, known_frames_prob, task_mix, generator, x0.device)
        if known_mask is None:
            return self._loss(x_t, t, tokens, x0, noise)
        known_mask = known_mask.to(x0.device).expand(b, f)
        t, x_t = conditioning.clean_known(t, x_t, x0, known_mask)
        return self._loss(x_t, t, tokens, x0, noise, frame_mask=~known_mask)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, steps: int = 50, guidance_scale: float = 7.5,
               guidance_rescale: float = 0.7, sampler: str = "ddim", generator: torch.Generator | None = None,
               num_frames: int | None = None, callback: Callable[[int, int], None] | None = None,
               known_frames=None, known_method: str = "clean", guidance_weight: float = 2.0,
               init_video: torch.Tensor | None = None, init_t: int | None = None) -> torch.Tensor:
        """Sample a clip (b, f, 3, H, W) in [-1, 1] from tokens (b, n, d) (DESIGN.md §3 defaults).

        ``init_video`` (b, f, 3, H, W) with ``init_t`` starts from that clip noised to the
        sampler's first timestep ≤ ``init_t`` instead of from pure noise (SDEdit); the
        steps above it are skipped. It tells at which noise level the tokens must take over
        (``scripts/diagnose_detokenizer.py --partial``).

        ``known_frames`` fixes frames (image-to-video, prediction, interpolation, extension):
        {frame index: (3, H, W) or (b, 3, H, W)} or (mask (f,) or (b, f), video (b, f, 3, H, W)),
        in [-1, 1]. ``known_method`` "clean" (UniCon), "replacement" or "guidance" (VDM, weight
        w_r = ``guidance_weight``) says how the sampler honours them (:mod:`divot.conditioning`).
        """
        cfg = self.config
        if cfg.one_step and (steps != 1 or guidance_scale != 1.0):
            logger.info("one-step de-tokenizer: decoding with 1 step and no guidance (asked: %d steps, "
                        "guidance %.1f)", steps, guidance_scale)
            steps, guidance_scale = 1, 1.0
        b, f = tokens.shape[0], num_frames or cfg.num_frames
        known = None
        if known_frames is not None:  # checked before any model work
            conditioning.check_method(known_method, guidance_weight)
            known = conditioning.normalize_known_frames(known_frames, b, f, cfg.frame_size)
        sched = diffusion.make_sampler(cfg.noise, sampler)
        sched.set_timesteps(steps, device=tokens.device)
        shape = (b, f, cfg.x_channels, cfg.x_size, cfg.x_size)
        x = torch.randn(shape, generator=generator, device=tokens.device) * sched.init_noise_sigma
        timesteps = sched.timesteps
        if init_video is not None:
            timesteps = self._start_from(init_video, init_t, sched, x)
            x = diffusion.q_sample(self.to_x(init_video.to(x.device, x.dtype)), x,
                                   torch.full(shape[:2], int(timesteps[0]), device=x.device), self.alphas_cumprod)
        cond = self.context(tokens)
        # Stochastic samplers take the generator; deterministic ones (UniPC) have no such argument.
        step_kw = {"generator": generator} if "generator" in inspect.signature(sched.step).parameters else {}
        if guidance_scale != 1.0:
            uncond = self.context(self.null_tokens.to(tokens.dtype).expand_as(tokens))
            cond = torch.cat([cond, uncond])
        v_fn = functools.partial(self._guided_v, cond=cond, scale=guidance_scale, rescale=guidance_rescale)
        if known is not None:
            mask, x_a = known.mask.to(x.device), self.to_x(known.video.to(x.device, x.dtype))
        for i, t in enumerate(timesteps):
            x_in = sched.scale_model_input(x, t)
            ts = torch.full(x_in.shape[:2], int(t), device=x.device, dtype=torch.long)
            if known is None:
                v = v_fn(x_in, ts)
            else:
                v = conditioning.known_frames_v(v_fn, x_in, ts, mask, x_a, known_method, self.alphas_cumprod,
                                                guidance_weight, generator)
            x = sched.step(v, t, x, **step_kw).prev_sample
            if callback is not None:
                callback(i + 1, len(timesteps))
        return self.from_x(x if known is None else conditioning.paste_known(x, x_a, mask))

    @staticmethod
    def _start_from(init_video: torch.Tensor, init_t: int | None, sched, noise: torch.Tensor) -> torch.Tensor:
        """The timesteps left when sampling starts from ``init_video`` noised to ``init_t``."""
        if init_t is None or init_video.shape[:2] != noise.shape[:2]:
            raise ValueError(f"init_video needs init_t and {tuple(noise.shape[:2])} (batch, frames), got "
                             f"init_t={init_t} and a video of shape {tuple(init_video.shape)}")
        if sched.init_noise_sigma != 1.0:  # σ-space samplers (Euler) do not take a q_sample'd input
            raise ValueError("init_video needs a sampler in variance-preserving form (ddim, dpm++, unipc, ddpm)")
        return diffusion.timesteps_below(sched, init_t)

    def _guided_v(self, x_in: torch.Tensor, ts: torch.Tensor, cond: torch.Tensor, scale: float,
                  rescale: float) -> torch.Tensor:
        """v at ``x_in``; with classifier-free guidance (``scale`` ≠ 1) ``cond`` is [cond; uncond]."""
        if scale == 1.0:
            return self.predict_v(x_in, ts, cond)
        v_c, v_u = self.predict_v(torch.cat([x_in, x_in]), torch.cat([ts, ts]), cond).chunk(2)
        return diffusion.guided(v_c, v_u, scale, rescale)

    # The VAE is left out of every state dict, also when this module sits inside another
    # (the training wrapper, accelerate's gather): hooks run at any depth, an override would not.
    @staticmethod
    def _drop_external_keys(module, state_dict, prefix, local_metadata) -> None:
        for key in [k for k in state_dict if any(k.startswith(prefix + p) for p in module.external_prefixes)]:
            del state_dict[key]

    def upgrade_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A copy of ``state`` with weights of an earlier layout of this module rewritten to the
        current one (``divot.modeling.load_state_dict_strict`` calls it before checking keys)."""
        state = dict(state)
        if upgrade_legacy_state(state, "pixel_head."):
            logger.warning("converted a pixel head saved in its first layout (divot/pixel_head.py); the "
                           "converted head is close to, not identical with, the saved one")
        return state

    @staticmethod
    def _forgive_external_missing(module, incompatible_keys) -> None:
        missing = incompatible_keys.missing_keys
        missing[:] = [k for k in missing if not any(k.startswith(p) or f".{p}" in k for p in module.external_prefixes)]
