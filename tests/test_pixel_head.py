"""The full-resolution pixel head of the tiny de-tokenizer (divot/pixel_head.py)."""
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from divot import config as cfglib
from divot import presets
from divot.detokenizer import DivotDetokenizer
from divot.modeling import atomic_save_state_dict
from divot.pixel_head import PixelHead
from divot.shapes import COLORS


@pytest.mark.parametrize("context_channels", [0, 8])
def test_fresh_head_leaves_the_unet_output_unchanged_and_round_trips(tmp_path, context_channels):
    torch.manual_seed(0)
    det = DivotDetokenizer(presets.detokenizer_config("tiny", pixel_head_width=16,
                                                      pixel_head_context=context_channels)).eval()
    with torch.no_grad():
        det.unet.conv_out.weight.normal_(std=0.02)  # a non-zero U-Net output to compare with
    c, n = det.config.x_channels, det.config.x_size
    x, t, tokens = torch.randn(2, 16, c, n, n), torch.randint(0, 1000, (2, 16)), torch.randn(2, 64, 32)
    ctx = det.context(tokens)
    head = det.pixel_head
    with torch.no_grad():
        det.pixel_head = None
        plain = det.network(x, t, ctx)
        det.pixel_head = head
        assert torch.allclose(det.network(x, t, ctx), plain, atol=1e-5)
        head.mlp[-1].weight.normal_(std=0.1)
        changed = det.network(x, t, ctx)
    assert not torch.allclose(changed, plain, atol=1e-3)
    det.save_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(changed, DivotDetokenizer.from_pretrained(tmp_path).eval().network(x, t, ctx))
    with pytest.raises(ValueError, match="pixel_head_width needs space='pixel'"):
        DivotDetokenizer(presets.detokenizer_config("tiny", pixel_head_width=16, space="latent", pixel_patch=1,
                                                    unet={"in_channels": 4, "out_channels": 4}))
    with pytest.raises(ValueError, match="pixel_head_context needs a pixel head"):
        DivotDetokenizer(presets.detokenizer_config("tiny", pixel_head_width=0, pixel_head_context=8))
    with pytest.raises(ValueError, match="must hold the 64 context tokens"):
        DivotDetokenizer(presets.detokenizer_config("tiny", pixel_head_context=8, context_grid=[2, 4, 4],
                                                    unet={"cross_attention_locality": 0.0}))


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


def _train_colour_task(context_channels: int, steps: int = 250) -> float:
    """Grey squares on black as the estimate; each square's true colour is named only by the
    context token of its quadrant (a (1, 2, 2) grid). Returns the held-out error."""
    torch.manual_seed(0)
    palette = torch.tensor(list(COLORS.values())) / 127.5 - 1
    head = PixelHead(patch=4, width=32, num_train_timesteps=1000, context_dim=8,
                     context_channels=context_channels, context_grid=(1, 2, 2))
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    mask = torch.zeros(16, 16, dtype=torch.bool)
    for y in (2, 10):
        for x in (2, 10):
            mask[y:y + 4, x:x + 4] = True

    def fold(v):
        return rearrange(v, "b f c (h p1) (w p2) -> b f (c p1 p2) h w", p1=4, p2=4)

    def batch(b=4, f=2):
        which = torch.randint(len(palette), (b, 4))  # one colour per quadrant
        colour = rearrange(palette[which], "b (qh qw) c -> b c qh qw", qh=2)
        colour = colour.repeat_interleave(8, -2).repeat_interleave(8, -1)  # (b, 3, 16, 16)
        clean = torch.where(mask, colour, torch.tensor(-1.0))[:, None].expand(b, f, 3, 16, 16)
        grey = torch.where(mask, torch.tensor(0.6), torch.tensor(-1.0)).expand(b, f, 3, 16, 16)
        context = torch.nn.functional.one_hot(which, 8).float()  # (b, 4 tokens, 8)
        return fold(grey), fold(clean), context

    t = torch.full((4, 2), 999)
    for _ in range(steps):
        grey, clean, context = batch()
        loss = (head(grey, grey, t, context) - clean).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    grey, clean, context = batch()
    with torch.no_grad():
        return (head(grey, grey, t, context) - clean).pow(2).mean().item()


def test_head_with_context_reads_the_colour_its_token_names():
    """Without the context map the head can only learn the mean colour; with it, the error
    must fall far below that."""
    blind, reading = _train_colour_task(0), _train_colour_task(8)
    assert reading < 0.3 * blind, (reading, blind)


def test_first_layout_converts_exactly_where_the_context_map_is_constant(tmp_path):
    """A head saved in the first layout (one 3×3 conv over [pixels; context map], 1×1 convs)
    loads through ``from_pretrained``; with the same context at every grid place (a constant
    map) it computes what the first layout computed, away from the frame's border."""
    torch.manual_seed(0)
    det = DivotDetokenizer(presets.detokenizer_config("tiny", pixel_head_width=16, pixel_head_context=8)).eval()
    state = det.state_dict()
    for key in [k for k in state if k.startswith("pixel_head.") and not k.startswith("pixel_head.context_proj")]:
        del state[key]
    legacy = {"net.0.weight": 0.2 * torch.randn(16, 15, 3, 3), "net.0.bias": 0.1 * torch.randn(16),
              "net.2.weight": 0.2 * torch.randn(16, 16, 1, 1), "net.2.bias": 0.1 * torch.randn(16),
              "net.4.weight": 0.2 * torch.randn(3, 16, 1, 1), "net.4.bias": 0.1 * torch.randn(3)}
    state.update({"pixel_head." + k: v for k, v in legacy.items()})
    state["pixel_head.context_proj.weight"] = 0.3 * torch.randn(8, det.config.context_dim)
    atomic_save_state_dict(state, tmp_path / "model.safetensors")
    cfglib.save_json(det.config, tmp_path, extra={"_class": "DivotDetokenizer"})
    loaded = DivotDetokenizer.from_pretrained(tmp_path).eval()

    c, n, p = det.config.x_channels, det.config.x_size, det.config.pixel_patch
    x0, x_in, t = torch.randn(1, 2, c, n, n), torch.randn(1, 2, c, n, n), torch.full((1, 2), 400)
    context = torch.randn(1, 1, det.config.context_dim).expand(1, 64, -1)  # one token everywhere
    with torch.no_grad():
        new = loaded.pixel_head(x0, x_in, t, context) - x0
        head = loaded.pixel_head
        pix = [rearrange(v, "b f (c p1 p2) h w -> (b f) c (h p1) (w p2)", p1=p, p2=p) for v in (x0, x_in)]
        level = torch.full_like(pix[0][:, :1], 0.4)
        ctx_map = head.context_proj(context[:, 0]).reshape(1, 8, 1, 1).expand(2, 8, 32, 32)
        h = F.silu(F.conv2d(torch.cat([*pix, level, ctx_map], 1), legacy["net.0.weight"], legacy["net.0.bias"],
                            padding=1))
        h = F.silu(F.conv2d(h, legacy["net.2.weight"], legacy["net.2.bias"]))
        old = F.conv2d(h, legacy["net.4.weight"], legacy["net.4.bias"])
    new = rearrange(new, "b f (c p1 p2) h w -> (b f) c (h p1) (w p2)", p1=p, p2=p)
    torch.testing.assert_close(new[..., 1:-1, 1:-1], old[..., 1:-1, 1:-1], atol=1e-5, rtol=1e-4)
