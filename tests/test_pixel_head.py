"""The full-resolution pixel head of the tiny de-tokenizer (divot/pixel_head.py)."""
import pytest
import torch
from einops import rearrange

from divot import presets
from divot.detokenizer import DivotDetokenizer
from divot.pixel_head import PixelHead
from divot.shapes import COLORS


def test_fresh_head_leaves_the_unet_output_unchanged_and_round_trips(tmp_path):
    torch.manual_seed(0)
    det = DivotDetokenizer(presets.detokenizer_config("tiny", pixel_head_width=16)).eval()
    with torch.no_grad():
        det.unet.conv_out.weight.normal_(std=0.02)  # a non-zero U-Net output to compare with
    x, t, tokens = torch.randn(2, 16, 48, 8, 8), torch.randint(0, 1000, (2, 16)), torch.randn(2, 64, 32)
    ctx = det.context(tokens)
    head = det.pixel_head
    with torch.no_grad():
        det.pixel_head = None
        plain = det.network(x, t, ctx)
        det.pixel_head = head
        assert torch.allclose(det.network(x, t, ctx), plain, atol=1e-5)
        head.net[-1].weight.normal_(std=0.1)
        changed = det.network(x, t, ctx)
    assert not torch.allclose(changed, plain, atol=1e-3)
    det.save_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(changed, DivotDetokenizer.from_pretrained(tmp_path).eval().network(x, t, ctx))
    with pytest.raises(ValueError, match="pixel_head_width needs space='pixel'"):
        DivotDetokenizer(presets.detokenizer_config("tiny", pixel_head_width=16, space="latent", pixel_patch=1,
                                                    unet={"in_channels": 4, "out_channels": 4}))


def test_head_learns_to_remove_per_pixel_noise():
    """Clips of palette colours on black, seen through noise σ = 0.25, as the estimate and as the
    input: the head must beat that estimate, whose error is σ², by snapping pixels back."""
    torch.manual_seed(0)
    palette = torch.tensor([[0.0, 0.0, 0.0]] * 6 + list(COLORS.values())) / 127.5 - 1  # mostly black
    head = PixelHead(patch=4, width=32, num_train_timesteps=1000)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    sigma = 0.25

    def batch():
        pix = palette[torch.randint(len(palette), (2, 4, 16, 16))]  # (b, f, h, w, 3)
        x0 = rearrange(pix, "b f (h p1) (w p2) c -> b f (c p1 p2) h w", p1=4, p2=4)
        return x0, x0 + sigma * torch.randn_like(x0)

    for _ in range(300):
        x0, x_in = batch()
        out = head(x_in, x_in, torch.full((2, 4), 50))
        loss = (out - x0).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    x0, x_in = batch()
    with torch.no_grad():
        err = (head(x_in, x_in, torch.full((2, 4), 50)) - x0).pow(2).mean().item()
    assert err < 0.5 * sigma ** 2, err
