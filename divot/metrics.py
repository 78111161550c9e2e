"""Image/video fidelity metrics as pure functions: PSNR, SSIM and the background's level.

Inputs are videos (…, 3, h, w) in [-1, 1] (the project's convention); both
metrics work on [0, 1] intensities and average over frames. SSIM follows Wang et
al. 2004: 11×11 Gaussian window (σ = 1.5), K1 = 0.01, K2 = 0.03, computed per
channel and averaged; windows are clipped at the border ("valid" region).

Axes: n = images, c = channels, h, w = height, width.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange


def _unit(x: torch.Tensor) -> torch.Tensor:
    return ((x.float() + 1) / 2).clamp(0, 1)


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-clip PSNR in dB over all frames; shapes (b, f, 3, h, w) → (b,)."""
    mse = (_unit(pred) - _unit(target)).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def _gaussian_window(size: int, sigma: float, device) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim_images(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """SSIM of images (n, c, h, w) in [0, 1] → (n,). Small images shrink the window to fit."""
    window = min(window, a.shape[-1], a.shape[-2])
    if window % 2 == 0:
        window -= 1
    c = a.shape[1]
    w = _gaussian_window(window, sigma, a.device).expand(c, 1, window, window)
    mu_a, mu_b = F.conv2d(a, w, groups=c), F.conv2d(b, w, groups=c)
    var_a = F.conv2d(a * a, w, groups=c) - mu_a ** 2
    var_b = F.conv2d(b * b, w, groups=c) - mu_b ** 2
    cov = F.conv2d(a * b, w, groups=c) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(dim=1)


def ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-clip SSIM averaged over frames; shapes (b, f, 3, h, w) → (b,)."""
    b = pred.shape[0]
    s = ssim_images(rearrange(_unit(pred), "b f c h w -> (b f) c h w"),
                    rearrange(_unit(target), "b f c h w -> (b f) c h w"))
    return rearrange(s, "(b f) -> b f", b=b).mean(dim=1)


def _black(target: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """Where ``target`` (…, 3, h, w) is pure black (all channels below half a grey level)."""
    return (_unit(target) <= 0.5 / 255).all(dim=-3, keepdim=keepdim)


def background_level(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Median grey level (0–255, mean of RGB) of ``pred`` where ``target`` is pure black.

    On the Shapes world's black background a few levels above 0 cost much SSIM: on a flat
    window SSIM's luminance term with its constant (0.01)² is about 0.29 for a 4-level offset
    (docs/TOKENIZER_TRAINING.md, finding 16). NaN when ``target`` has no black pixel.
    """
    black = _black(target)  # (b, f, h, w)
    if not black.any():
        return float("nan")
    grey = _unit(pred).mean(dim=-3) * 255
    return grey[black].median().item()


def ssim_background_fixed(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-clip SSIM after setting ``pred`` to black wherever ``target`` is pure black: SSIM of the
    objects alone, without the background offset that :func:`background_level` measures."""
    black = _black(target, keepdim=True)
    return ssim(torch.where(black, torch.full_like(pred, -1.0), pred), target)


def mean_ci95(values) -> tuple[float, float]:
    """Mean and the half-width of its normal-approximation 95% interval."""
    t = torch.as_tensor(values, dtype=torch.float64)
    if t.numel() == 0:
        return float("nan"), float("nan")
    half = 1.96 * t.std(unbiased=True).item() / t.numel() ** 0.5 if t.numel() > 1 else float("nan")
    return t.mean().item(), half
