"""Priors on the condition path: the resamplers' and the U-Net's locality prior, zero-initialised condition inputs."""
import re

import pytest
import torch

from divot import presets
from divot.detokenizer import DivotDetokenizer
from divot.resampler import PerceiverResampler, grid_coords, locality_bias
from divot.tokenizer import DivotTokenizer


def test_grid_coords_are_cell_centres():
    c = grid_coords((2, 4))
    assert c.shape == (8, 2)
    assert torch.allclose(c[0], torch.tensor([0.25, 0.125]))
    assert torch.allclose(c[-1], torch.tensor([0.75, 0.875]))


def test_locality_bias_values():
    bias = locality_bias((1, 2, 2), (1, 2, 2), (0.5, 0.0))
    assert bias.shape == (2, 4, 8)  # heads, latents, inputs + latents
    assert torch.all(bias[1] == 0)  # σ = 0: a global head
    # Same place: no penalty; one cell (0.5) away: -0.25 / (2 · 0.25) = -0.5.
    assert bias[0, 0, 0] == 0 and bias[0, 0, 4] == 0
    assert torch.isclose(bias[0, 0, 1], torch.tensor(-0.5))
    assert torch.isclose(bias[0, 0, 3], torch.tensor(-1.0))


def _sharp(seed=0):
    torch.manual_seed(seed)
    return PerceiverResampler(8, 16, 8, num_latents=4, depth=1, heads=2, dim_head=8,
                              locality=(0.05, 0.05), input_grid=(1, 2, 2), latent_grid=(1, 2, 2)).eval()


def test_latents_read_their_own_place():
    """A change at one input moves the latent sitting there, and (almost) not the far one."""
    model = _sharp()
    x = torch.randn(1, 4, 8)
    moved = x.clone()
    moved[0, 0] += 3.0  # the top-left input
    with torch.no_grad():
        delta = (model(moved) - model(x)).norm(dim=-1)[0]
    assert delta[0] > 0.1
    assert delta[3] < 1e-3 * delta[0]  # bottom-right latent: σ = 0.05, distance ≈ 0.71

    plain = PerceiverResampler(8, 16, 8, num_latents=4, depth=1, heads=2, dim_head=8).eval()
    with torch.no_grad():
        delta_plain = (plain(moved) - plain(x)).norm(dim=-1)[0]
    assert delta_plain[3] > 0.1 * delta_plain[0]  # without the prior every latent sees it


def test_locality_input_errors():
    with pytest.raises(ValueError, match="one σ >= 0 per head"):
        PerceiverResampler(8, 16, 8, 4, 1, heads=2, locality=(0.1,), input_grid=(4,), latent_grid=(4,))
    with pytest.raises(ValueError, match="latent_grid of 4 cells"):
        PerceiverResampler(8, 16, 8, 4, 1, heads=1, locality=(0.1,), input_grid=(4,), latent_grid=(2,))
    model = _sharp()
    with pytest.raises(ValueError, match="expects 4 inputs, got 5"):
        model(torch.randn(1, 5, 8))


def test_tiny_models_with_locality_round_trip(tmp_path):
    """The bias is rebuilt from config.json, not stored: save/load gives the same forward."""
    torch.manual_seed(0)
    tok = DivotTokenizer(presets.tokenizer_config("tiny", resampler_locality=(0.15, 0.3, 0.6, 0.0))).eval()
    det = DivotDetokenizer(presets.detokenizer_config(
        "tiny", resampler_depth=2, resampler_locality=(0.15, 0.3, 0.6, 0.0), context_tokens=32,
        context_grid=(2, 4, 4))).eval()
    assert "image_proj_model.down_sampler.attn_bias" not in tok.state_dict()
    tok.save_pretrained(tmp_path / "tok")
    det.save_pretrained(tmp_path / "det")
    tok2 = DivotTokenizer.from_pretrained(tmp_path / "tok").eval()
    det2 = DivotDetokenizer.from_pretrained(tmp_path / "det").eval()
    video = torch.rand(1, 5, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        tokens = tok(video)
        assert torch.equal(tokens, tok2(video))
        assert torch.equal(det.context(tokens), det2.context(tokens))


def test_diagnose_tokenizer_smoke(capsys):
    """The read-out diagnostic runs both read-outs; --freeze leaves the tokens as they were."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import diagnose_tokenizer

    frozen = diagnose_tokenizer.main(["--freeze", "--locality", "0.2,0.2,0.4,0", "--steps", "2", "--every", "1",
                                      "--batch-size", "2"])
    first = capsys.readouterr().out.splitlines()[1]
    assert f"token_spread {frozen['token_spread']:.4f}" in first  # unchanged by training
    row = diagnose_tokenizer.main(["--readout", "attention", "--steps", "1", "--batch-size", "2"])
    assert set(row) == {"step", "mse", "mse_other_clip_tokens", "mse_constant_clip", "token_spread", "seconds",
                        "probe_color", "probe_shape", "probe_direction"}
    assert 0 < row["mse_constant_clip"] < row["mse"] < 2
    assert row["probe_shape"] < 0.5  # one step of a random read-out draws no shapes
    ceiling = re.search(r"true frames: colour ([\d.]+), shape ([\d.]+), direction ([\d.]+)",
                        capsys.readouterr().out).groups()
    assert all(float(x) >= 0.9 for x in ceiling)  # the probe reads the 5 tokenizer frames themselves


def _first_attention(det: DivotDetokenizer):
    """The spatial transformer of the U-Net's first level with attention (4×4 in ``tiny``)."""
    return next(level[0].attn for level in det.unet.down if level[0].attn is not None)


def test_unet_cross_attention_locality_reads_its_own_place():
    """With a sharp prior, changing the context token of one corner moves that corner's output."""
    cfg = presets.detokenizer_config("tiny", resampler_depth=2, context_tokens=16, context_grid=(1, 4, 4),
                                     unet={"cross_attention_locality": 0.05})
    torch.manual_seed(0)
    det = DivotDetokenizer(cfg).eval()
    with torch.no_grad():
        for p in det.unet.parameters():  # zero-init outputs would hide any dependence
            p.add_(torch.randn_like(p) * 0.02)
        blk = _first_attention(det)  # the 4×4 level
        x = torch.randn(2, blk.proj_in.in_features, 4, 4)
        ctx = torch.randn(2, 16, cfg.context_dim)
        moved = ctx.clone()
        moved[:, 0] += 3.0  # the context token of the top-left cell
        delta = (blk(x, moved, 1) - blk(x, ctx, 1)).abs().mean(dim=(0, 1))  # (h, w)
    assert delta[0, 0] > 100 * delta[3, 3]
    bias = blk.cross_bias(2, 1, 4, 4)
    assert bias.shape == (2, 16, 16) and torch.all(bias.diagonal(dim1=1, dim2=2) == 0)
    with pytest.raises(ValueError, match="must hold the 32 context tokens"):
        DivotDetokenizer(presets.detokenizer_config("tiny", resampler_depth=2, context_tokens=32))


def test_condition_zero_init_starts_blind_but_learns():
    """At init the context changes nothing (no condition noise to shrink it); gradients still reach
    the zeroed entries, so the condition path can open."""
    cfg = presets.detokenizer_config("tiny")  # zero-initialised condition inputs
    torch.manual_seed(0)
    det = DivotDetokenizer(cfg)
    with torch.no_grad():
        det.unet.conv_out.weight.normal_(std=0.02)  # else the zero output layer hides everything
    x, t = torch.randn(2, 16, cfg.x_channels, cfg.x_size, cfg.x_size), torch.randint(0, 1000, (2, 16))
    tokens = torch.randn(2, 64, 32)
    out = det(x, t, tokens)
    assert torch.equal(out, det(x, t, tokens.roll(1, 0)))
    out.pow(2).mean().backward()
    to_out = _first_attention(det).attn2.to_out[0]
    assert to_out.weight.grad.abs().sum() > 0
    assert det.unet.context_embedding.linear_2.weight.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in det.image_proj_model.parameters())


def test_detokenizer_without_resampler_projects_the_tokens(tmp_path):
    cfg = presets.detokenizer_config("tiny")  # no resampler, locality in the U-Net
    torch.manual_seed(0)
    det = DivotDetokenizer(cfg).eval()
    tokens = torch.randn(2, 64, 32)
    ctx = det.context(tokens)
    assert ctx.shape == (2, 64, cfg.context_dim)
    # token i stays context token i (a batched and a single matmul differ by rounding, ~4e-7 on AMD EPYC)
    assert torch.allclose(ctx[:, 5], det.image_proj_model(tokens[:, 5]), atol=1e-5)
    det.save_pretrained(tmp_path)
    x, t = torch.randn(1, 16, cfg.x_channels, cfg.x_size, cfg.x_size), torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        assert torch.equal(det(x, t, tokens[:1]), DivotDetokenizer.from_pretrained(tmp_path).eval()(x, t, tokens[:1]))
    with pytest.raises(ValueError, match="resampler_depth=0 needs"):
        DivotDetokenizer(presets.detokenizer_config("tiny", context_tokens=32, context_grid=(2, 4, 4)))


def test_local_queries_start_from_the_input_at_their_place():
    """Latent (0, 0) starts as the input there, so a change at that input moves it more than
    the latents far away, without any attention prior; without local queries all can move alike."""
    torch.manual_seed(0)
    kw = dict(num_latents=4, depth=1, heads=2, dim_head=8, input_grid=(1, 2, 2), latent_grid=(1, 2, 2))
    local = PerceiverResampler(8, 16, 8, local_queries=True, **kw).eval()
    assert "attn_bias" not in dict(local.named_buffers())  # no locality prior: global attention
    x = torch.randn(1, 4, 8)
    moved = x.clone()
    moved[0, 0] += 3.0
    with torch.no_grad():
        delta = (local(moved) - local(x)).norm(dim=-1)[0]
        # Same inputs laid on a finer latent grid: interpolation, cell centres aligned.
        assert torch.allclose(local._local(x), x, atol=1e-6)
    assert delta[0] > 3 * delta[1:].max()

    torch.manual_seed(0)
    plain = PerceiverResampler(8, 16, 8, num_latents=4, depth=1, heads=2, dim_head=8).eval()
    with torch.no_grad():
        delta_plain = (plain(moved) - plain(x)).norm(dim=-1)[0]
    assert delta_plain[0] < 3 * delta_plain[1:].max()  # some far latent moves as much


def test_local_queries_errors_and_round_trip(tmp_path):
    with pytest.raises(ValueError, match="local_queries needs input_grid"):
        PerceiverResampler(8, 16, 8, 4, 1, heads=1, local_queries=True)
    with pytest.raises(ValueError, match="of one rank"):
        PerceiverResampler(8, 16, 8, 4, 1, heads=1, local_queries=True, input_grid=(4, 1), latent_grid=(4,))
    torch.manual_seed(0)
    tok = DivotTokenizer(presets.tokenizer_config("tiny", resampler_local_queries=True)).eval()
    tok.save_pretrained(tmp_path / "tok")
    tok2 = DivotTokenizer.from_pretrained(tmp_path / "tok").eval()
    assert tok2.config.resampler_local_queries
    video = torch.rand(1, 5, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(tok(video), tok2(video))
