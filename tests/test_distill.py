"""One-step de-tokenizer distillation (SF-V): losses, noise draws, discriminator, the training script."""
from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from einops import rearrange

from divot import diffusion, distill
from divot.detokenizer import DivotDetokenizer
from divot.discriminator import Discriminator, DiscriminatorConfig
from divot.presets import detokenizer_config, tokenizer_config
from divot.tokenizer import DivotTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
FRAMES = 4  # the unit tests' clips; the script test uses the preset's 16


def _detok(frames: int = FRAMES, seed: int = 0) -> DivotDetokenizer:
    torch.manual_seed(seed)
    return DivotDetokenizer(detokenizer_config("tiny", num_frames=frames, unet={"num_frames": frames})).eval()


def _inputs(det: DivotDetokenizer, b: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    cfg = det.config
    x0 = torch.rand(b, cfg.num_frames, cfg.x_channels, cfg.x_size, cfg.x_size, generator=g) * 2 - 1
    tokens = torch.randn(b, cfg.num_tokens, cfg.token_dim, generator=g)
    return x0, tokens


# --------------------------------------------------------------------------- pure functions
def test_hinge_and_pseudo_huber_match_hand_computed_values():
    real = [torch.tensor([[0.5, 2.0]]), torch.tensor([[-1.0]])]
    fake = [torch.tensor([[-2.0, 0.0]]), torch.tensor([[3.0]])]
    # head 0: mean(relu(0.5), relu(-1)) + mean(relu(-1), relu(1)) = 0.25 + 0.5; head 1: 2 + 4
    assert distill.hinge_d_loss(real, fake).item() == pytest.approx((0.75 + 6.0) / 2)
    assert distill.hinge_g_loss(fake).item() == pytest.approx((1.0 + -3.0) / 2)  # −mean per head
    a = torch.zeros(2, 1, 3)
    b = torch.tensor([[[3.0, 4.0, 0.0]], [[0.0, 0.0, 0.0]]])  # ‖a−b‖² = 25 and 0
    assert distill.pseudo_huber(a, b, c=1.0).item() == pytest.approx((math.sqrt(26) - 1) / 2)
    assert distill.pseudo_huber(a, b, c=1e-6).item() == pytest.approx(2.5, abs=1e-5)  # → L2 norm for small c
    assert distill.huber_c(10_000, 0.03) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="shapes differ"):
        distill.pseudo_huber(a, b[:1], c=1.0)


def test_log_normal_discriminator_timesteps_follow_the_config():
    acp = diffusion.alphas_cumprod(diffusion.NoiseConfig())
    table = distill.log_sigmas(acp)
    assert torch.all(table[1:] > table[:-1])  # σ grows with t
    spreads = {}
    for mean, std in ((-1.2, 1.2), (0.5, 0.4)):
        g = torch.Generator().manual_seed(0)
        t = distill.sample_discriminator_timesteps(20_000, acp, mean, std, generator=g)
        assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 999
        drawn = table[t]
        assert drawn.mean().item() == pytest.approx(mean, abs=0.1)
        assert drawn.std().item() == pytest.approx(std, rel=0.1)
        spreads[std] = t.float().std().item()
    assert spreads[0.4] < spreads[1.2]
    picks = distill.sample_generator_timesteps(500, (999, 249), generator=torch.Generator().manual_seed(0))
    assert set(picks.tolist()) == {999, 249}


def test_loss_config_is_checked():
    good = distill.DistillLossConfig()
    distill.check_loss_config(good, 1000)
    with pytest.raises(ValueError, match="must include 999"):
        distill.check_loss_config(distill.DistillLossConfig(generator_timesteps=(500,)), 1000)
    with pytest.raises(ValueError, match="outside"):
        distill.check_loss_config(distill.DistillLossConfig(generator_timesteps=(999, 1000)), 1000)


# --------------------------------------------------------------------------- discriminator
def test_discriminator_features_are_the_teacher_unets_own():
    teacher = _detok()
    with torch.no_grad():  # wake the zero-initialised temporal layers, so they are compared too
        for p in teacher.parameters():
            p.add_(0.02 * torch.randn_like(p))
    disc = Discriminator(copy.deepcopy(teacher))
    x_t, tokens = _inputs(teacher)
    t = torch.tensor([[10, 500, 900, 999], [3, 3, 3, 3]])
    context = teacher.context(tokens)
    seen = []
    unet = teacher.unet
    # Each down block ends in its downsampler, the last (an Identity the U-Net skips) in its last layer.
    ends = [layers[-1] if isinstance(down, torch.nn.Identity) else down
            for layers, down in zip(unet.down, unet.downsamplers)]
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out)) for m in [*ends, unet.mid[-1]]]
    with torch.no_grad():
        teacher.predict_v(x_t, t, context)  # the full teacher, its input preparation included
        feats = disc.features(x_t, t, context)
        again = disc.features(x_t, t, context)
    for h in hooks:
        h.remove()
    assert len(feats) == len(seen) == len(again) == len(unet.cfg.block_out_channels) + 1
    for a, b, c in zip(feats, seen, again):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(c, b)
    heads = set(disc.head_parameters())
    assert len(disc.encoder.up) == 0 and not any(p.requires_grad for p in disc.parameters() if p not in heads)


def test_discriminator_step_trains_heads_only_and_generator_step_trains_generator_only():
    gen, teacher = _detok(), _detok()
    disc = Discriminator(teacher)
    x0, tokens = _inputs(gen)
    context = disc.context(tokens)
    cfg = distill.DistillLossConfig()
    loss, logs = distill.discriminator_loss(gen, disc, x0, tokens, context, cfg)
    loss.backward()
    assert set(logs) == {"loss_d", "d_real", "d_fake"} and torch.isfinite(loss)
    encoder = list(disc.encoder.parameters()) + list(disc.front.parameters())  # U-Net encoder, resampler, …
    assert encoder and all(not p.requires_grad and p.grad is None for p in encoder)
    heads = disc.head_parameters()
    assert all(p.grad is not None for p in heads) and sum(p.grad.abs().sum() for p in heads) > 0
    assert all(p.grad is None for p in gen.parameters())
    for p in heads:
        p.grad = None
    loss, logs = distill.generator_loss(gen, disc, x0, tokens, context, cfg)
    loss.backward()
    assert logs["g_recon"] > 0 and torch.isfinite(loss)
    assert all(p.grad is None for p in heads) and all(p.requires_grad for p in heads)  # restored
    assert all(p.grad is None for p in encoder)
    assert sum(p.grad.abs().sum() for p in gen.parameters() if p.grad is not None) > 0


def test_temporal_heads_see_frame_order_and_spatial_heads_do_not():
    det = _detok()
    disc = Discriminator(det).eval()
    x_t, tokens = _inputs(det, b=1)
    context = disc.context(tokens)
    perm = torch.tensor([2, 0, 3, 1])
    inv = torch.argsort(perm)
    with torch.no_grad():
        feats = disc.features(x_t, torch.full((1, FRAMES), 300), context)
        # The same encoder features with their frames shuffled: isolates what the heads see.
        shuffled = [rearrange(rearrange(x, "(b f) c h w -> b f c h w", f=FRAMES)[:, perm], "b f c h w -> (b f) c h w")
                    for x in feats]
        a, b = disc.classify(feats, context, FRAMES), disc.classify(shuffled, context, FRAMES)
    assert any(k.startswith("temporal") for k in a) and any(k.startswith("spatial") for k in a)
    for key in a:
        if key.startswith("spatial"):  # the same logits, in the shuffled order
            back = rearrange(b[key], "b (f p) -> b f p", f=FRAMES)[:, inv]
            torch.testing.assert_close(back, rearrange(a[key], "b (f p) -> b f p", f=FRAMES))
        else:
            back = rearrange(b[key], "b (p f) -> b p f", f=FRAMES)[:, :, inv]
            assert (back - rearrange(a[key], "b (p f) -> b p f", f=FRAMES)).abs().max() > 1e-4, key
    with torch.no_grad():  # and through the whole discriminator: shuffled clips, other temporal logits
        whole = disc(x_t, torch.full((1, FRAMES), 300), context)
        whole_shuffled = disc(x_t[:, perm], torch.full((1, FRAMES), 300), context)
    assert not torch.allclose(whole["temporal0"], whole_shuffled["temporal0"])
    ablation = Discriminator(_detok(), DiscriminatorConfig(heads="spatial"))
    assert all(k.startswith("spatial") for k in ablation.heads)
    with pytest.raises(ValueError, match="heads"):
        Discriminator(_detok(), DiscriminatorConfig(heads="temporal"))


# --------------------------------------------------------------------------- the script
@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> Path:
    """A tiny random tokenizer + de-tokenizer pair, saved like a pretrain_tokenizer run."""
    root = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    DivotTokenizer(tokenizer_config("tiny")).save_pretrained(root / "tokenizer")
    DivotDetokenizer(detokenizer_config("tiny")).save_pretrained(root / "detokenizer")
    return root


def _argv(teacher_run: Path, out: Path, *extra: str) -> list[str]:
    return ["--output-dir", str(out), f"teacher_dir={teacher_run / 'detokenizer'}",
            f"tokenizer_dir={teacher_run / 'tokenizer'}", "batch_size=1", "log_every=1", "save_every=1",
            "warmup_steps=1", *extra]


def test_bad_settings_stop_before_training(teacher_run, tmp_path):
    from training.distill_detokenizer import main
    for extra, message in ((["discriminator.heads=temporal"], "heads"),
                           (["loss.generator_timesteps=[500]"], "999"),
                           (["teacher_dir=/nonexistent"], "not a trained model directory"),
                           (["loss.huber_cc=1"], "unknown config key")):
        with pytest.raises(SystemExit) as err:
            main(_argv(teacher_run, tmp_path / "bad", *extra))  # later overrides win
        assert message in str(err.value)
    assert not (tmp_path / "bad").exists()


def test_phase_schedule_gives_the_idle_group_no_learning_rate():
    from training.distill_detokenizer import DistillTrainConfig, phase_lambdas
    d, g = phase_lambdas(DistillTrainConfig(warmup_steps=2))
    assert [d(k) for k in range(6)] == [0.5, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert [g(k) for k in range(6)] == [0.0, 0.5, 0.0, 1.0, 0.0, 1.0]


def test_distillation_run_resumes_and_writes_a_one_step_detokenizer(teacher_run, tmp_path, monkeypatch):
    from training.distill_detokenizer import main
    monkeypatch.setenv("DIVOT_NUM_THREADS", "1")
    out = tmp_path / "run"
    main(_argv(teacher_run, out, "--max-steps", "1"))
    assert (out / "checkpoints" / "step_00000001" / "trainer_state.json").is_file()
    main(_argv(teacher_run, out, "--max-steps", "2", "--resume"))
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]  # the resumed run went on from step 1
    for key in ("loss_d", "g_adv", "g_recon", "d_real", "d_fake"):
        assert all(math.isfinite(r[key]) for r in lines), key

    student = DivotDetokenizer.from_pretrained(out / "detokenizer")
    teacher = DivotDetokenizer.from_pretrained(teacher_run / "detokenizer")
    assert student.config.one_step and not teacher.config.one_step
    moved = [k for k, v in student.state_dict().items() if not torch.equal(v, teacher.state_dict()[k])]
    assert moved, "training did not change the generator"
    calls = []
    student.unet.register_forward_hook(lambda *_: calls.append(1))
    tokens = DivotTokenizer.from_pretrained(out / "tokenizer")(torch.rand(1, 16, 3, 32, 32) * 2 - 1)
    video = student.decode(tokens, steps=50, guidance_scale=7.5, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 1
    assert video.shape == (1, 16, 3, 32, 32) and torch.isfinite(video).all()

    spec = importlib.util.spec_from_file_location("bench_one_step", REPO / "scripts" / "bench_one_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--teacher", str(teacher_run), "--student", str(out), "--clips", "1", "--batch-size", "1",
                         "--steps", "2", "--threads", "1", "--output", str(tmp_path / "bench.json")])
    rows = {r["model"]: r for r in result["rows"]}
    assert rows["teacher"]["unet_evals_per_batch"] == 2 and rows["student"]["unet_evals_per_batch"] == 1
    assert json.loads((tmp_path / "bench.json").read_text())["speedups"]["student"]["unet"] > 0


def test_each_phase_moves_only_its_own_group(teacher_run, monkeypatch):
    # β1 > 0 and weight decay: the idle group must stay put by its zero rate, not by luck.
    from training import runtime
    from training.distill_detokenizer import (DistillTrainConfig, allow_idle_parameters, build_model, param_groups,
                                              phase_lambdas, run_phase)
    monkeypatch.setenv("DIVOT_NUM_THREADS", "1")
    cfg = DistillTrainConfig(teacher_dir=str(teacher_run / "detokenizer"), tokenizer_dir=str(teacher_run / "tokenizer"),
                             betas=(0.9, 0.99), weight_decay=0.01, warmup_steps=1)
    accelerator = allow_idle_parameters(runtime.make_accelerator())
    model = build_model(cfg)
    optimizer = torch.optim.AdamW(param_groups(model, cfg), betas=cfg.betas, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, phase_lambdas(cfg))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    video = torch.rand(1, 16, 3, 32, 32) * 2 - 1
    parts = {"d": model.discriminator.heads, "g": model.generator}

    def snapshot():
        return {name: [p.detach().clone() for p in part.parameters()] for name, part in parts.items()}

    for phase in ("d", "g", "d", "g"):
        before = snapshot()
        run_phase(cfg, accelerator, model, optimizer, scheduler, phase, [video])
        after = snapshot()
        for name in parts:
            moved = sum(not torch.equal(a, b) for a, b in zip(before[name], after[name]))
            assert (moved > 0) == (name == phase), (phase, name, moved)
    assert all(p.requires_grad for part in parts.values() for p in part.parameters())
