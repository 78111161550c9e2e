"""Noise schedule, v-prediction algebra, guidance, metrics and the strict config loader."""
from dataclasses import dataclass, field

import pytest
import torch

from divot import config as cfglib
from divot import diffusion, metrics
from divot.presets import detokenizer_config


def test_schedule_zero_terminal_snr_and_endpoints():
    acp = diffusion.alphas_cumprod(diffusion.NoiseConfig())
    assert acp.shape == (1000,)
    assert acp[-1].item() == pytest.approx(0.0, abs=1e-7)  # rescaled: pure noise at t = T-1
    assert acp[0].item() == pytest.approx(1 - 0.00085, rel=1e-3)
    assert torch.all(acp[1:] <= acp[:-1])


def test_v_prediction_round_trip_per_frame_timesteps():
    acp = diffusion.alphas_cumprod(diffusion.NoiseConfig())
    x0, eps = torch.randn(2, 4, 3, 5, 5), torch.randn(2, 4, 3, 5, 5)
    t = torch.tensor([[0, 10, 500, 999], [999, 999, 3, 3]])
    xt = diffusion.q_sample(x0, eps, t, acp)
    v = diffusion.v_target(x0, eps, t, acp)
    assert torch.allclose(diffusion.x0_from_v(xt, v, t, acp), x0, atol=1e-4)
    # t = T-1 is pure noise, and there v = -x0.
    assert torch.allclose(xt[1, 0], eps[1, 0], atol=1e-5)
    assert torch.allclose(v[1, 0], -x0[1, 0], atol=1e-5)
    assert diffusion.v_loss(v, x0, eps, t, acp).item() == pytest.approx(0.0, abs=1e-10)
    mask = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]])
    noisy = v.clone()
    noisy[:, 1:] += 1.0  # errors only on masked-out frames
    assert diffusion.v_loss(noisy, x0, eps, t, acp, frame_mask=mask).item() == pytest.approx(0.0, abs=1e-10)


def test_timestep_sampling_shared_and_per_frame():
    g = torch.Generator().manual_seed(0)
    shared = diffusion.sample_timesteps(64, 16, 1000, 0.0, generator=g)
    assert (shared == shared[:, :1]).all()
    mixed = diffusion.sample_timesteps(256, 16, 1000, 0.5, generator=g)
    independent = (mixed != mixed[:, :1]).any(dim=1).float().mean().item()
    assert 0.35 < independent < 0.65


def test_guidance_and_rescale():
    g = torch.Generator().manual_seed(0)
    c, u = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    assert torch.allclose(diffusion.guided(c, u, 1.0), c, atol=1e-6)  # u + (c − u): rounding only
    g = diffusion.guided(c, u, 7.5, rescale=1.0)
    assert torch.allclose(g.std(dim=(1, 2)), c.std(dim=(1, 2)), rtol=1e-4)


@pytest.mark.parametrize("kind", diffusion.SAMPLERS)
def test_samplers_start_at_pure_noise(kind):
    s = diffusion.make_sampler(diffusion.NoiseConfig(), kind)
    s.set_timesteps(25)
    assert int(s.timesteps[0]) == 999 and len(s.timesteps) == 25


def test_psnr_ssim():
    a = torch.rand(2, 4, 3, 32, 32) * 2 - 1
    assert metrics.ssim(a, a).allclose(torch.ones(2), atol=1e-5)
    assert torch.all(metrics.psnr(a, a) > 90)
    noisy = (a + 0.2 * torch.randn_like(a)).clamp(-1, 1)
    assert torch.all(metrics.ssim(noisy, a) < 0.95)
    # PSNR of a uniform error of 0.1 (in [0, 1] units) is 20 dB.
    assert metrics.psnr(torch.full_like(a, 0.2), torch.zeros_like(a)).allclose(torch.full((2,), 20.0), atol=1e-4)


def test_background_level_and_fixed_ssim():
    target = torch.full((1, 2, 3, 48, 48), -1.0)
    target[..., 4:10, 4:10] = 0.6  # a grey square on black: most SSIM windows are flat black
    grey4 = -1.0 + 2 * 4 / 255  # four grey levels above black
    pred = torch.where(target > -1, target, torch.full_like(target, grey4))
    assert abs(metrics.background_level(pred, target) - 4.0) < 1e-3
    assert metrics.background_level(target, target) == 0.0
    assert metrics.ssim(pred, target).item() < 0.6  # the offset costs SSIM ...
    assert metrics.ssim_background_fixed(pred, target).allclose(torch.ones(1), atol=1e-5)  # ... and only it


@dataclass(frozen=True)
class _Inner:
    lr: float
    steps: int = 3


@dataclass(frozen=True)
class _Outer:
    name: str = "x"
    sizes: tuple[int, ...] = (1, 2)
    inner: _Inner = field(default_factory=lambda: _Inner(lr=0.1))
    maybe: int | None = None


def test_config_strict_typed_and_partial_nested():
    cfg = cfglib.from_dict(_Outer, cfglib.parse_overrides(["inner.steps=7", "sizes=4,5", "--maybe=3"]))
    assert cfg == _Outer(sizes=(4, 5), inner=_Inner(lr=0.1, steps=7), maybe=3)
    with pytest.raises(cfglib.ConfigError, match="unknown config key"):
        cfglib.from_dict(_Outer, {"inner": {"lrr": 1}})
    with pytest.raises(cfglib.ConfigError, match="expected int"):
        cfglib.from_dict(_Outer, {"inner": {"steps": "many"}})
    assert cfglib.from_dict(_Outer, cfglib.to_dict(cfg)) == cfg


def test_presets_unknown_key_raises():
    with pytest.raises(cfglib.ConfigError):
        detokenizer_config("tiny", unet={"channels": 3})
    with pytest.raises(ValueError, match="unknown"):
        detokenizer_config("huge")
