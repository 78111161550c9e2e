"""Tokenizer, resampler, U-Net and de-tokenizer: shapes, release layout, save/load, per-frame time."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from divot import diffusion, presets
from divot.autoencoder import VideoAutoencoder
from divot.detokenizer import DivotDetokenizer
from divot.modeling import CheckpointError
from divot.resampler import PerceiverResampler
from divot.tokenizer import DivotTokenizer

RELEASE = json.loads((Path(__file__).parent / "data" / "divot_release_keys.json").read_text())


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return DivotTokenizer(presets.tokenizer_config("tiny")), DivotDetokenizer(presets.detokenizer_config("tiny"))


def test_tiny_tokenizer_output_shape_and_frame_selection(tiny):
    tok, _ = tiny
    clip16 = torch.rand(2, 16, 3, 32, 32) * 2 - 1
    out = tok(clip16)
    assert out.shape == (2, 64, tok.config.token_dim)
    # A 16-frame clip is read through frames 0, 4, 8, 12, 15 only.
    assert torch.allclose(out, tok(clip16[:, [0, 4, 8, 12, 15]]), atol=1e-5)
    changed = clip16.clone()
    changed[:, 1] = 0  # frame 1 is not among the tokenizer's frames
    assert torch.allclose(out, tok(changed), atol=1e-5)
    changed[:, 4] = 0
    assert not torch.allclose(out, tok(changed), atol=1e-5)


def test_paper_tokenizer_matches_release_layout():
    """Names and shapes of every non-ViT tensor equal the official Divot_tokenizer.bin layout."""
    tok = DivotTokenizer(presets.tokenizer_config("paper", vit={"depth": 1}))  # ViT depth is irrelevant here
    own = {k: list(v.shape) for k, v in tok.state_dict().items() if not k.startswith("vit.")}
    assert own == RELEASE["tokenizer"]
    assert sum(v.numel() for k, v in tok.state_dict().items() if not k.startswith("vit.")) == 171_635_968
    assert tok.vit.width == 1280 and tok.vit.grid == (16, 16)


def test_paper_detokenizer_resampler_matches_release():
    cfg = presets.detokenizer_config("paper")
    r = PerceiverResampler(cfg.token_dim, cfg.context_dim, cfg.context_dim, cfg.context_tokens,
                           cfg.resampler_depth, cfg.resampler_heads, cfg.resampler_dim_head)
    own = {"image_proj_model." + k: list(v.shape) for k, v in r.state_dict().items()}
    assert own == RELEASE["detokenizer.image_proj_model"]


def test_paper_tokenizer_forward_shape_small_vit():
    tok = DivotTokenizer(presets.tokenizer_config("paper", vit={"depth": 1})).eval()
    with torch.no_grad():
        out = tok(torch.zeros(1, 5, 3, 256, 256))
    assert out.shape == (1, 64, 256)
    assert not any(p.requires_grad for p in tok.vit.parameters())  # frozen by default


@pytest.mark.parametrize("which", ["tokenizer", "detokenizer"])
def test_save_load_round_trip_identical_forward(tiny, tmp_path, which):
    tok, det = tiny
    model = tok if which == "tokenizer" else det
    model.eval()
    with torch.no_grad():
        model.null_tokens.normal_() if which == "detokenizer" else None
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    torch.manual_seed(1)
    if which == "tokenizer":
        x = torch.rand(2, 5, 3, 32, 32) * 2 - 1
        assert torch.equal(model(x), loaded(x))
    else:
        c, n = det.config.x_channels, det.config.x_size
        x, t, z = torch.randn(2, 16, c, n, n), torch.randint(0, 1000, (2, 16)), torch.randn(2, 64, 32)
        assert torch.equal(model(x, t, z), loaded(x, t, z))
        assert torch.equal(model.null_tokens, loaded.null_tokens)


def test_from_pretrained_reports_mismatch(tiny, tmp_path):
    tok, _ = tiny
    tok.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["token_dim"] = 16
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        DivotTokenizer.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no config.json"):
        DivotTokenizer.from_pretrained(tmp_path / "nothing")


def test_unet_time_conditioning_is_per_frame(tiny):
    _, det = tiny
    torch.manual_seed(0)
    for p in det.unet.parameters():  # zero-init output layers would hide any dependence
        p.data.add_(torch.randn_like(p) * 0.02)
    det.eval()
    c, n = det.config.x_channels, det.config.x_size
    x, z = torch.randn(1, 16, c, n, n), torch.randn(1, 64, 32)
    t = torch.full((1, 16), 500)
    base = det(x, t, z)
    t2 = t.clone()
    t2[0, 3] = 10
    out = det(x, t2, z)
    assert not torch.allclose(out[:, 3], base[:, 3])
    # (b,) timesteps mean the same level for every frame.
    assert torch.allclose(det(x, torch.tensor([500]), z), base, atol=1e-5)


def test_decode_shape_and_seeded_determinism(tiny):
    _, det = tiny
    z = torch.randn(2, 64, 32)
    a = det.decode(z, steps=3, generator=torch.Generator().manual_seed(0))
    b = det.decode(z, steps=3, generator=torch.Generator().manual_seed(0))
    assert a.shape == (2, 16, 3, 32, 32) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b)
    c = det.decode(z, steps=3, sampler="dpm++", guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
    assert c.shape == a.shape and torch.isfinite(c).all()


def test_autoencoder_rejects_mismatched_parts(tiny, tmp_path):
    tok, det = tiny
    other = DivotDetokenizer(presets.detokenizer_config("tiny", token_dim=16))
    with pytest.raises(CheckpointError, match="tokens"):
        VideoAutoencoder(tok, other)
    moved = DivotDetokenizer(presets.detokenizer_config("tiny", token_grid=[2, 8, 4], context_grid=[2, 8, 4]))
    with pytest.raises(CheckpointError, match="token_grid"):
        VideoAutoencoder(tok, moved)
    VideoAutoencoder(tok, det).save_pretrained(tmp_path)
    ae = VideoAutoencoder.from_pretrained(tmp_path)
    assert ae.frame_size == 32
    with pytest.raises(CheckpointError, match="lacks"):
        VideoAutoencoder.from_pretrained(tmp_path / "tokenizer")


def test_latent_space_detokenizer_with_local_vae(tmp_path):
    """``paper``-style latent diffusion: a (tiny, random) diffusers AutoencoderKL from a local directory."""
    from diffusers import AutoencoderKL
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    cfg = presets.detokenizer_config(
        "tiny", space="latent", pixel_head_width=0, pixel_head_context=0, vae_path=str(tmp_path / "vae"),
        vae_downsample=2, frame_size=16, vae_decode_batch=5,
        unet={"in_channels": 4, "out_channels": 4, "block_out_channels": [16, 32],
              "attention_levels": [False, True], "norm_num_groups": 4})
    det = DivotDetokenizer(cfg)
    video = torch.rand(1, 16, 3, 16, 16) * 2 - 1
    assert det.to_x(video).shape == (1, 16, 4, 8, 8)
    loss = det.training_loss(video, torch.randn(1, 64, 32))
    loss.backward()
    assert all(p.grad is None for p in det.vae.parameters())  # frozen
    out = det.decode(torch.randn(1, 64, 32), steps=2, guidance_scale=1.0)
    assert out.shape == (1, 16, 3, 16, 16)
    det.save_pretrained(tmp_path / "det")  # VAE weights stay in their own directory
    assert not any(k.startswith("vae.") for k in load_file(str(tmp_path / "det" / "model.safetensors")))
    again = DivotDetokenizer.from_pretrained(tmp_path / "det")
    assert torch.equal(again.unet.conv_in.weight, det.unet.conv_in.weight)
    # Nested (the training wrapper, accelerate's gather) the VAE stays out as well, and a
    # strict load of the wrapper does not ask for it.
    wrapper = torch.nn.ModuleDict({"detokenizer": det})
    state = wrapper.state_dict()
    assert state and not any(".vae." in k for k in state)
    assert not torch.nn.ModuleDict({"detokenizer": again}).load_state_dict(state, strict=True).missing_keys
    # Frames decode in chunks of 5 (across clips), each exactly as the VAE decodes it alone.
    x = det.to_x(torch.rand(2, 16, 3, 16, 16) * 2 - 1)
    with torch.no_grad():
        alone = torch.stack([det.vae.decode(x[:, i] / cfg.vae_scale).sample for i in range(16)], 1)
        torch.testing.assert_close(det.from_x(x), alone.clamp(-1, 1), rtol=1e-4, atol=1e-5)
    # Weights in bf16 (DeepSpeed bf16 casts the model, not its inputs): fp32 clips still work.
    det.to(torch.bfloat16)
    assert torch.isfinite(det.training_loss(video, torch.randn(1, 64, 32))).all()


@pytest.mark.parametrize("sampler", diffusion.SAMPLERS)
def test_decode_with_oracle_unet_recovers_the_clip(tiny, sampler, monkeypatch):
    """If the network predicted the exact v of a target clip, every sampler must land on that clip."""
    _, det = tiny
    target = torch.rand(1, 16, 3, 32, 32) * 2 - 1
    x0 = det.to_x(target)

    def oracle(x_t, t, context):
        a = det.alphas_cumprod[t].view(*t.shape, 1, 1, 1)
        # v such that sqrt(a)·x_t − sqrt(1−a)·v = x0
        return (a.sqrt() * x_t - x0.expand_as(x_t)) / (1 - a).sqrt().clamp_min(1e-4)

    monkeypatch.setattr(det, "predict_v", oracle)
    out = det.decode(torch.randn(1, 64, 32), steps=10, sampler=sampler, guidance_scale=2.0,
                     generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, target, atol=2e-2), (out - target).abs().max()


def test_edm_parameterization_gives_exact_v_for_the_ideal_output(tiny):
    """With F = (x0 − c_skip·x_t)/c_out the preconditioned model must return the true v."""
    _, det = tiny
    assert det.config.noise.parameterization == "edm"
    c, n = det.config.x_channels, det.config.x_size
    x0, eps = torch.randn(2, 16, c, n, n), torch.randn(2, 16, c, n, n)
    t = torch.tensor([[999] * 16, [3] * 16])
    acp = det.alphas_cumprod
    x_t = diffusion.q_sample(x0, eps, t, acp)
    c_skip, c_out, c_in = diffusion.edm_coefficients(acp, t, 5, det.config.noise.sigma_data)
    assert torch.isfinite(c_skip).all() and torch.isfinite(c_in).all()

    class Ideal(torch.nn.Module):
        def forward(self, x_in, tt, ctx):
            return (x0 - c_skip * x_t) / c_out

    real = det.unet
    det.unet = Ideal()
    try:
        v = det.predict_v(x_t, t, torch.zeros(2, 64, 128))
    finally:
        det.unet = real
    assert torch.allclose(v, diffusion.v_target(x0, eps, t, acp), atol=1e-3)


def test_bf16_weights_take_fp32_clips():
    """DeepSpeed bf16 casts the modules, not their inputs: fp32 clips and tokens must still go in."""
    torch.manual_seed(0)
    tok = DivotTokenizer(presets.tokenizer_config("tiny")).to(torch.bfloat16)
    det = DivotDetokenizer(presets.detokenizer_config("tiny")).to(torch.bfloat16)
    video = torch.rand(2, 16, 3, 32, 32) * 2 - 1
    tokens = tok(video)
    assert tokens.dtype == torch.bfloat16 and torch.isfinite(tokens.float()).all()
    loss = det.training_loss(video, tokens.float())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
