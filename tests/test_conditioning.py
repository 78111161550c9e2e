"""Known frames: UniCon task masks in training, clean / replacement / reconstruction-guidance
sampling (divot/conditioning.py, DivotDetokenizer.training_loss / decode) on a tiny random model."""
import pytest
import torch

from divot import conditioning as C
from divot import config as cfglib
from divot import diffusion

from _detok_fixtures import F, SIZE, tiny_detokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def detok():
    return tiny_detokenizer()


def clips(b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, F, 3, SIZE, SIZE, generator=g) * 2 - 1, torch.randn(b, 4, 8, generator=g)


# ---------------------------------------------------------------- task masks
def test_named_task_masks():
    assert C.task_mask("video", 8).tolist() == [False] * 8
    assert C.task_mask("image_to_video", 8).tolist() == [True] + [False] * 7
    assert C.task_mask("prediction", 8, k=3).tolist() == [True] * 3 + [False] * 5
    assert C.task_mask("interpolation", 8).tolist() == [True] + [False] * 6 + [True]
    with pytest.raises(ValueError, match="unknown task 'extend'"):
        C.task_mask("extend", 8)
    with pytest.raises(ValueError, match="1 <= k < f"):
        C.task_mask("prediction", 8, k=8)


def test_draw_task_masks_follows_mix_and_prob():
    g = torch.Generator().manual_seed(0)
    assert not C.draw_task_masks(64, F, 0.0, generator=g).any()
    interp = C.draw_task_masks(16, F, 1.0, C.TaskMix(0, 0, 1), generator=g)
    assert (interp == C.task_mask("interpolation", F)).all()
    pred = C.draw_task_masks(300, F, 1.0, C.TaskMix(0, 1, 0, min_k=2, max_k=5), generator=g)
    ks = pred.sum(1)
    assert (pred == (torch.arange(F)[None] < ks[:, None])).all()  # always a prefix
    assert set(ks.tolist()) == {2, 3, 4, 5}
    mixed = C.draw_task_masks(400, F, 0.5, generator=g)
    share = mixed.any(1).float().mean().item()
    assert 0.35 < share < 0.65
    kinds = {tuple(m.tolist()) for m in mixed if m.any()}
    assert tuple(C.task_mask("image_to_video", F).tolist()) in kinds
    assert tuple(C.task_mask("interpolation", F).tolist()) in kinds
    with pytest.raises(ValueError, match="weights"):
        C.TaskMix(-1, 1, 1)
    with pytest.raises(ValueError, match="min_k"):
        C.TaskMix(min_k=4, max_k=3)
    with pytest.raises(ValueError, match="probability"):
        C.draw_task_masks(2, F, 1.5)


# ---------------------------------------------------------------- training
@pytest.mark.parametrize("parameterization", ["v", "edm"])
def test_training_loss_known_frames_clean_at_t0_and_out_of_the_loss(parameterization):
    model = tiny_detokenizer(parameterization)
    video, tokens = clips()
    known = torch.stack([C.task_mask("prediction", F, 3), C.task_mask("interpolation", F)])
    seen, delta = {}, {"value": None}

    def hook(module, args, out):
        seen["x"], seen["t"] = args[0].detach(), args[1].detach()
        return out if delta["value"] is None else out + delta["value"]

    def loss(**kw):
        return model.training_loss(video, tokens, generator=torch.Generator().manual_seed(5), **kw).item()

    handle = model.unet.register_forward_hook(hook)
    try:
        base = loss(known_mask=known)
        assert (seen["t"][known] == 0).all() and (seen["t"][~known] > 0).all()
        if parameterization == "v":  # the U-Net sees x_t itself: the known frames are the clean clip
            assert torch.equal(seen["x"][known], model.to_x(video)[known])
        big = torch.zeros(2, F, 48, 4, 4)
        delta["value"] = big.masked_fill(known[..., None, None, None], 100.0)
        assert loss(known_mask=known) == pytest.approx(base, rel=1e-6)  # known frames' output is ignored
        delta["value"] = big.masked_fill(~known[..., None, None, None], 100.0)
        assert loss(known_mask=known) > base + 100
        delta["value"] = None
        plain = loss()
        assert loss(known_frames_prob=0.0) == plain  # no mask: the same random stream as before
        assert loss(known_frames_prob=1.0) != plain
    finally:
        handle.remove()


def test_train_config_and_autoencoder_pass_known_frames(monkeypatch):
    from training.tokenizer_setup import TokenizerAutoencoder, TokenizerTrainConfig
    cfg = cfglib.from_dict(TokenizerTrainConfig, {"known_frames_prob": 0.3,
                                                  "known_frames_tasks": {"prediction": 2.0, "max_k": 6}})
    assert cfg.known_frames_prob == 0.3 and cfg.known_frames_tasks == C.TaskMix(prediction=2.0, max_k=6)
    assert cfglib.from_dict(TokenizerTrainConfig, cfglib.to_dict(cfg)) == cfg
    with pytest.raises(cfglib.ConfigError, match="known_frames_tasks.sideways"):
        cfglib.from_dict(TokenizerTrainConfig, {"known_frames_tasks": {"sideways": 1.0}})
    with pytest.raises(ValueError, match="weights"):
        cfglib.from_dict(TokenizerTrainConfig, {"known_frames_tasks": {"prediction": -1.0}})

    class Tok(torch.nn.Module):
        def forward(self, video):
            return torch.zeros(video.shape[0], 4, 8)

    detok, seen = tiny_detokenizer(), {}
    monkeypatch.setattr(detok, "training_loss", lambda video, tokens, **kw: seen.update(kw) or torch.zeros(()))
    TokenizerAutoencoder(Tok(), detok)(clips()[0], known_frames_prob=0.3, task_mix=cfg.known_frames_tasks)
    assert seen["known_frames_prob"] == 0.3 and seen["task_mix"] == cfg.known_frames_tasks


# ---------------------------------------------------------------- user input
def test_normalize_known_frames_forms_and_errors():
    video, _ = clips()
    k = C.normalize_known_frames({0: video[0, 0], -1: video[:, 5]}, 2, F, SIZE)
    assert k.mask.tolist() == [[True] + [False] * 6 + [True]] * 2
    assert torch.equal(k.video[1, 0], video[0, 0]) and torch.equal(k.video[1, 7], video[1, 5])
    assert (k.video[:, 1:7] == 0).all()
    pair = C.normalize_known_frames((C.task_mask("prediction", F, 2), video), 2, F)
    assert pair.mask[:, :2].all() and torch.equal(pair.video[:, :2], video[:, :2]) and (pair.video[:, 2:] == 0).all()
    assert torch.equal(C.normalize_known_frames(pair, 2, F).video, pair.video)
    bad = [({8: video[0, 0]}, ValueError, "index 8 is out of range for a 8-frame clip"),
           ({0: video[0, 0], -8: video[0, 1]}, ValueError, "frame 0 is given twice"),
           ({"0": video[0, 0]}, TypeError, "frame indices"),
           ({}, ValueError, "empty"),
           ({0: video[0, 0, :2]}, ValueError, r"must be \(3, H, W\)"),
           ({0: video[:, 0].repeat(2, 1, 1, 1)}, ValueError, r"\(2, 3, H, W\)"),
           ({0: video[0, 0] * 3}, ValueError, r"in \[-1, 1\]"),
           ({0: (video[0, 0] > 0).to(torch.uint8)}, TypeError, "to_tensor"),
           ((torch.ones(F, dtype=torch.int64), video), TypeError, "bool"),
           ((torch.ones(F - 1, dtype=torch.bool), video), ValueError, "mask must be"),
           ((torch.ones(F, dtype=torch.bool), video[:, :, 0]), ValueError, "video must be"),
           (video, TypeError, "mapping")]
    for spec, error, message in bad:
        with pytest.raises(error, match=message):
            C.normalize_known_frames(spec, 2, F, SIZE)
    with pytest.raises(ValueError, match="16×16"):
        C.normalize_known_frames({0: torch.zeros(3, 8, 8)}, 2, F, SIZE)


def test_decode_rejects_bad_known_input_before_model_work(detok, monkeypatch):
    _, tokens = clips()
    monkeypatch.setattr(detok, "context", lambda *a: pytest.fail("model ran"))
    with pytest.raises(ValueError, match="unknown known_method 'inpaint'"):
        detok.decode(tokens, steps=2, known_frames={0: torch.zeros(3, SIZE, SIZE)}, known_method="inpaint")
    with pytest.raises(ValueError, match="out of range"):
        detok.decode(tokens, steps=2, known_frames={F: torch.zeros(3, SIZE, SIZE)})


# ---------------------------------------------------------------- sampling
def decode(model, tokens, **kw):
    return model.decode(tokens, steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(0), **kw)


@pytest.mark.parametrize("method,sampler", [("clean", "ddim"), ("replacement", "ddim"), ("guidance", "ddim"),
                                            ("clean", "dpm++"), ("replacement", "euler")])
def test_known_frames_stay_exactly_fixed(detok, method, sampler):
    video, tokens = clips()
    out = decode(detok, tokens, known_frames={0: video[:, 0], 1: video[:, 1], F - 1: video[:, F - 1]},
                 known_method=method, sampler=sampler)
    assert torch.equal(out[:, [0, 1, F - 1]], video[:, [0, 1, F - 1]])
    free = decode(detok, tokens, sampler=sampler)
    assert torch.isfinite(out).all() and not torch.allclose(out[:, 2:F - 1], free[:, 2:F - 1], atol=1e-4)


def test_no_known_frame_changes_nothing(detok):
    video, tokens = clips()
    free = decode(detok, tokens)
    none_known = (torch.zeros(F, dtype=torch.bool), video)
    for method in C.KNOWN_METHODS:
        assert torch.allclose(decode(detok, tokens, known_frames=none_known, known_method=method), free, atol=1e-5)


def test_what_the_model_sees_per_method(detok):
    video, tokens = clips()
    mask = C.task_mask("prediction", F, 2)
    seen = []
    handle = detok.unet.register_forward_hook(lambda m, args, out: seen.append((args[0].detach(), args[1].detach())))
    try:
        decode(detok, tokens, known_frames={0: video[:, 0], 1: video[:, 1]}, known_method="clean")
        clean, seen[:] = list(seen), []
        decode(detok, tokens, known_frames={0: video[:, 0], 1: video[:, 1]}, known_method="replacement")
        replaced = list(seen)
    finally:
        handle.remove()
    x_a = detok.to_x(video).repeat(2, 1, 1, 1, 1)  # classifier-free guidance doubles the batch
    for x, t in clean:  # UniCon: clean known frames at timestep 0, the rest at the sampler's t
        assert (t[:, mask] == 0).all() and (t[:, ~mask] == t[0, -1]).all() and t[0, -1] > 0
        assert torch.equal(x[:, mask], x_a[:, mask])
    for x, t in replaced:  # VDM replacement: one shared t, known frames noised afresh
        assert (t == t[0, 0]).all()
        assert not torch.allclose(x[:, mask], x_a[:, mask], atol=1e-3)


def test_reconstruction_guidance_gradient_matches_finite_differences():
    model = tiny_detokenizer().double()
    g = torch.Generator().manual_seed(3)
    z = torch.randn(1, F, 48, 4, 4, generator=g, dtype=torch.float64)
    x_a = torch.randn(1, F, 48, 4, 4, generator=g, dtype=torch.float64)
    mask = C.task_mask("prediction", F, 3)[None]
    t = torch.full((1, F), 500)
    ctx = model.context(torch.randn(1, 4, 8, generator=g, dtype=torch.float64))

    def x0_fn(z_):
        return diffusion.x0_from_v(z_, model.predict_v(z_, t, ctx), t, model.alphas_cumprod)

    def energy(z_):
        return (x_a - x0_fn(z_))[mask].pow(2).sum()

    weight, alpha = 3.0, 0.7
    with torch.no_grad():
        x_hat = x0_fn(z)
        x_tilde = C.reconstruction_guidance(x0_fn, z, x_a, mask, weight, alpha)
        assert torch.equal(x_tilde[mask], x_hat[mask])  # known frames: x̂_a unchanged
        grad = (x_hat - x_tilde) * 2 / (weight * alpha)  # recovered ∇_z ‖x_a − x̂_a‖² on the unknown frames
        assert grad[~mask].abs().max() > 1e-3  # the unknown frames really do affect x̂_a
        h = 1e-5
        for idx in torch.randint(0, 48 * 16, (6,), generator=g).tolist():
            for frame in (3, 6):
                e = torch.zeros_like(z)
                e[0, frame].view(-1)[idx] = h
                fd = (energy(z + e) - energy(z - e)) / (2 * h)
                assert grad[0, frame].reshape(-1)[idx].item() == pytest.approx(fd.item(), rel=1e-4, abs=1e-8)
        assert torch.equal(C.reconstruction_guidance(x0_fn, z, x_a, mask, weight, 0.0), x_hat)


def test_guidance_weight_zero_is_replacement_and_weight_changes_it(detok):
    video, tokens = clips()
    known = {0: video[:, 0], 1: video[:, 1]}
    replaced = decode(detok, tokens, known_frames=known, known_method="replacement")
    zero = decode(detok, tokens, known_frames=known, known_method="guidance", guidance_weight=0.0)
    strong = decode(detok, tokens, known_frames=known, known_method="guidance", guidance_weight=20.0)
    assert torch.allclose(zero, replaced, atol=1e-5)
    assert not torch.allclose(strong[:, 2:], replaced[:, 2:], atol=1e-4)
    with pytest.raises(ValueError, match="guidance_weight"):
        decode(detok, tokens, known_frames=known, known_method="guidance", guidance_weight=-1.0)
