"""Known frames: per-frame noise levels (UniCon) and reconstruction guidance (VDM).

One de-tokenizer does token→video, image-to-video, prediction, interpolation and
extension by choosing which frames are *known* (DESIGN.md §6):

* **Training** (after UniCon, Li et al. 2024): a share of clips gets a task mask;
  known frames enter the U-Net clean, with timestep 0, and the loss covers only the
  unknown frames (:func:`draw_task_masks`, :func:`clean_known`, :func:`masked_frame_mean`).
* **Sampling** (:func:`known_frames_v`), three ways to honour the known frames x_a:

  - ``"clean"`` (UniCon): the model sees x_a with timestep 0 at every step, the
    unknown frames at the sampler's t. Needs a model trained with task masks.
  - ``"replacement"`` (Ho et al. 2022, §3.1): the model sees z_a ~ q(z_t | x_a), drawn
    afresh at the same t as the unknown frames. Works with any model.
  - ``"guidance"`` (Ho et al. 2022, eq. 7, reconstruction guidance): replacement, plus
    the unknown frames' x̂_b corrected by the gradient of ‖x_a − x̂_a(z_t)‖² with
    respect to z_b (:func:`reconstruction_guidance`).

  In every case the scheduler is handed, for the known frames, the v that denoises
  them to exactly x_a, and the sampled output's known frames are set to x_a, so they
  equal the given frames up to the pixel/latent round trip.

The sampler's "model input" x_in is the VP sample x_t = α_t·x_0 + σ_t·ε with
α_t = sqrt(ᾱ_t), σ_t = sqrt(1 − ᾱ_t) (``scheduler.scale_model_input`` maps every
diffusers sampler's state to it). All samplers here update elementwise, so what a
known frame's sampler state holds never reaches an unknown frame except through
the model.

Axes: b = batch, f = frames, c = channels, h, w = height, width.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from divot import diffusion

TASKS = ("video", "image_to_video", "prediction", "interpolation")
KNOWN_METHODS = ("clean", "replacement", "guidance")
DEFAULT_PREDICTION_FRAMES = 4


# ------------------------------------------------------------------ task masks
def task_mask(task: str, f: int, k: int = DEFAULT_PREDICTION_FRAMES) -> torch.Tensor:
    """(f,) bool, True where a frame is given: "video" none, "image_to_video" the first,
    "prediction" the first ``k``, "interpolation" the first and the last."""
    if f < 2:
        raise ValueError(f"a clip needs at least 2 frames for a task mask, got f={f}")
    mask = torch.zeros(f, dtype=torch.bool)
    if task == "video":
        return mask
    if task == "image_to_video":
        mask[0] = True
    elif task == "prediction":
        if not 1 <= k < f:
            raise ValueError(f"prediction needs 1 <= k < f known frames, got k={k} for f={f}")
        mask[:k] = True
    elif task == "interpolation":
        mask[[0, -1]] = True
    else:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    return mask


@dataclass(frozen=True)
class TaskMix:
    """Relative weights of the tasks a masked training clip gets, and the range of k
    (known first frames) for prediction; the unmasked share is "video" (token→video)."""
    image_to_video: float = 1.0
    prediction: float = 1.0
    interpolation: float = 1.0
    min_k: int = 2
    max_k: int = 8

    def __post_init__(self):
        weights = self.weights
        if min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"task weights must be >= 0 with a positive sum, got {weights}")
        if not 1 <= self.min_k <= self.max_k:
            raise ValueError(f"need 1 <= min_k <= max_k, got min_k={self.min_k}, max_k={self.max_k}")

    @property
    def weights(self) -> tuple[float, float, float]:
        return (self.image_to_video, self.prediction, self.interpolation)


def draw_task_masks(b: int, f: int, prob: float, mix: TaskMix | None = None,
                    generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """(b, f) bool known-frame masks: each clip gets a task mask with probability ``prob``
    (task drawn from ``mix``), otherwise none. k for prediction is uniform in
    [min_k, min(max_k, f − 1)]."""
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"known-frames probability must be in [0, 1], got {prob}")
    mix = mix or TaskMix()
    if mix.min_k >= f:
        raise ValueError(f"prediction needs min_k < f, got min_k={mix.min_k} for f={f}")
    masked = torch.rand(b, generator=generator, device=device) < prob
    weights = torch.tensor(mix.weights, dtype=torch.float, device=device)
    task = torch.multinomial(weights.expand(b, -1), 1, replacement=True, generator=generator)[:, 0]
    k = torch.randint(mix.min_k, min(mix.max_k, f - 1) + 1, (b,), generator=generator, device=device)
    idx = torch.arange(f, device=device)[None]
    first = idx == 0
    masks = torch.stack([first.expand(b, f),  # image_to_video
                         idx < k[:, None],  # prediction
                         (first | (idx == f - 1)).expand(b, f)], dim=1)  # interpolation
    chosen = masks[torch.arange(b, device=device), task]
    return chosen & masked[:, None]


def _frames(mask: torch.Tensor, ndim: int) -> torch.Tensor:
    """(b, f) → (b, f, 1, …) to broadcast over (b, f, c, h, w)."""
    return mask.view(tuple(mask.shape) + (1,) * (ndim - mask.ndim))


def clean_known(t: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """UniCon: known frames get timestep 0 and their clean value; the rest stay as drawn."""
    return torch.where(mask, torch.zeros_like(t), t), torch.where(_frames(mask, x_t.ndim), x0, x_t)


def masked_frame_mean(err: torch.Tensor, frame_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of a per-element error (b, f, …) over the frames where ``frame_mask`` (b, f) is True."""
    per_frame = err.float().mean(dim=tuple(range(2, err.ndim)))
    if frame_mask is None:
        return per_frame.mean()
    m = frame_mask.float()
    return (per_frame * m).sum() / m.sum().clamp_min(1.0)


# ------------------------------------------------------------------ user input
@dataclass(frozen=True)
class KnownFrames:
    """Normalised known frames: ``mask`` (b, f) bool and ``video`` (b, f, 3, H, W) in
    [-1, 1], zero where the mask is False."""
    mask: torch.Tensor
    video: torch.Tensor


def _check_range(x: torch.Tensor, what: str) -> None:
    if not torch.is_floating_point(x):
        raise TypeError(f"{what} must be a float tensor in [-1, 1], got dtype {x.dtype} "
                        f"(uint8 frames: use divot.video_io.to_tensor)")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1.001 or hi > 1.001 or math.isnan(lo) or math.isnan(hi):
        raise ValueError(f"{what} must lie in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]")


def _from_mapping(frames: Mapping, b: int, f: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not frames:
        raise ValueError("known_frames is empty; pass None when no frame is known")
    mask, video = torch.zeros(b, f, dtype=torch.bool), None
    for key, frame in frames.items():
        if isinstance(key, bool) or not isinstance(key, int):
            raise TypeError(f"known_frames keys are frame indices (int), got {key!r}")
        if not -f <= key < f:
            raise ValueError(f"known frame index {key} is out of range for a {f}-frame clip")
        i = key % f
        if mask[0, i]:
            raise ValueError(f"frame {i} is given twice in known_frames (indices {sorted(frames)})")
        frame = torch.as_tensor(frame)
        if frame.ndim == 3:
            frame = frame[None]
        if frame.ndim != 4 or frame.shape[1] != 3 or frame.shape[0] not in (1, b):
            raise ValueError(f"known frame {key} must be (3, H, W) or ({b}, 3, H, W), got {tuple(frame.shape)}")
        if video is None:
            video = torch.zeros(b, f, *frame.shape[1:])
        elif frame.shape[1:] != video.shape[2:]:
            raise ValueError(f"known frame {key} is {tuple(frame.shape[1:])}, others {tuple(video.shape[2:])}")
        _check_range(frame, f"known frame {key}")
        video[:, i] = frame.float()
        mask[:, i] = True
    return mask, video


def _from_pair(pair, b: int, f: int) -> tuple[torch.Tensor, torch.Tensor]:
    if len(pair) != 2:
        raise ValueError(f"known_frames as a sequence must be (mask, video), got {len(pair)} items")
    mask, video = (torch.as_tensor(p) for p in pair)
    if mask.dtype != torch.bool:
        raise TypeError(f"known-frames mask must be a bool tensor, got dtype {mask.dtype}")
    if mask.ndim == 1:
        mask = mask[None]
    if mask.ndim != 2 or mask.shape[1] != f or mask.shape[0] not in (1, b):
        raise ValueError(f"known-frames mask must be ({f},) or ({b}, {f}), got {tuple(mask.shape)}")
    if video.ndim != 5 or video.shape[1] != f or video.shape[2] != 3 or video.shape[0] not in (1, b):
        raise ValueError(f"known-frames video must be ({b}, {f}, 3, H, W), got {tuple(video.shape)}")
    mask = mask.expand(b, f).cpu()
    video = video.cpu().expand(b, *video.shape[1:])
    if mask.any():
        _check_range(video[mask], "known frames")
    video = video.float()
    return mask, torch.where(_frames(mask, 5), video, torch.zeros(()))


def normalize_known_frames(known, batch: int, num_frames: int, frame_size: int | None = None) -> KnownFrames:
    """``known`` as {frame index: (3, H, W) or (b, 3, H, W)} (negative indices count from
    the end), as (mask (f,) or (b, f) bool, video (b, f, 3, H, W)), or a
    :class:`KnownFrames` → :class:`KnownFrames` for ``batch`` clips of ``num_frames``."""
    if isinstance(known, KnownFrames):
        mask, video = _from_pair((known.mask, known.video), batch, num_frames)
    elif isinstance(known, Mapping):
        mask, video = _from_mapping(known, batch, num_frames)
    elif isinstance(known, (tuple, list)):
        mask, video = _from_pair(known, batch, num_frames)
    else:
        raise TypeError("known_frames must be a mapping {frame index: frame} or a (mask, video) pair, "
                        f"got {type(known).__name__}")
    if frame_size is not None and tuple(video.shape[-2:]) != (frame_size, frame_size):
        raise ValueError(f"known frames are {tuple(video.shape[-2:])} but the model makes "
                         f"{frame_size}×{frame_size} frames")
    return KnownFrames(mask.contiguous(), video.contiguous())


def check_method(method: str, weight: float) -> None:
    if method not in KNOWN_METHODS:
        raise ValueError(f"unknown known_method {method!r}; choose from {KNOWN_METHODS}")
    if method == "guidance" and not weight >= 0:
        raise ValueError(f"guidance_weight must be >= 0, got {weight}")


# ------------------------------------------------------------------ sampling
def reconstruction_guidance(x0_fn: Callable[[torch.Tensor], torch.Tensor], z_t: torch.Tensor,
                            x_a: torch.Tensor, mask: torch.Tensor, weight: float,
                            alpha: torch.Tensor | float) -> torch.Tensor:
    """VDM eq. 7: x̃_b = x̂_b − (w_r·α_t/2)·∇_{z_b} ‖x_a − x̂_a(z_t)‖², x̃_a = x̂_a.

    ``x0_fn`` maps z_t (b, f, c, h, w) to the model's x̂; ``mask`` (b, f) marks the known
    frames a; ``alpha`` is α_t = sqrt(ᾱ_t) (VP notation z_t = α_t·x + σ_t·ε, as in the
    paper), a float or broadcastable to z_t. The squared norm is a sum over each clip's
    known elements; clips in a batch do not interact, so one backward serves them all.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError("reconstruction guidance differentiates through the model: decode outside "
                           "torch.inference_mode() (torch.no_grad() is fine)")
    known = _frames(mask, z_t.ndim)
    with torch.enable_grad():
        z = z_t.detach().requires_grad_(True)
        x_hat = x0_fn(z)
        err = (x_a - x_hat).masked_fill(~known, 0.0).pow(2).sum()
        (grad,) = torch.autograd.grad(err, z)
    x_hat = x_hat.detach()
    return torch.where(known, x_hat, x_hat - (weight * alpha / 2) * grad)


def known_frames_v(v_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x_in: torch.Tensor,
                   t: torch.Tensor, mask: torch.Tensor, x_a: torch.Tensor, method: str, acp: torch.Tensor,
                   weight: float = 2.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """The v to hand the scheduler at one step, honouring the known frames.

    ``v_fn(z, timesteps)`` is the model's (guided) v; ``x_in`` the VP model input
    (b, f, c, h, w) at per-frame timesteps ``t`` (b, f), all equal to the sampler's t;
    ``x_a`` (b, f, c, h, w) the known frames in diffusion space where ``mask`` is True.
    """
    known = _frames(mask, x_in.ndim)
    v_known = diffusion.v_from_x0(x_in, x_a, t, acp)  # denoises a known frame to exactly x_a
    if method == "clean":
        v = v_fn(torch.where(known, x_a, x_in), torch.where(mask, torch.zeros_like(t), t))
        return torch.where(known, v_known, v)
    noise = torch.randn(x_a.shape, generator=generator, device=x_a.device, dtype=x_a.dtype)
    z = torch.where(known, diffusion.q_sample(x_a, noise, t, acp), x_in)  # z_a ~ q(z_t | x_a)
    if method == "replacement":
        v = v_fn(z, t)
    elif method == "guidance":
        def x0_fn(z_: torch.Tensor) -> torch.Tensor:
            return diffusion.x0_from_v(z_, v_fn(z_, t), t, acp)
        alpha = _frames(acp.to(t.device)[t].sqrt(), x_in.ndim)
        v = diffusion.v_from_x0(z, reconstruction_guidance(x0_fn, z, x_a, mask, weight, alpha), t, acp)
    else:
        raise ValueError(f"unknown known_method {method!r}; choose from {KNOWN_METHODS}")
    return torch.where(known, v_known, v)


def paste_known(x0: torch.Tensor, x_a: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The sampled clip with its known frames set to the given ones (all diffusion space)."""
    return torch.where(_frames(mask.to(x0.device), x0.ndim), x_a, x0)
