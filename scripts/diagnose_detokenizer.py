"""Does a trained de-tokenizer read its tokens? Per-noise-level errors, token spread, guidance effect.

    python scripts/diagnose_detokenizer.py runs/tokenizer [--clips 8]
    python scripts/diagnose_detokenizer.py runs/tokenizer/checkpoints/step_00000500   # mid-run

For held-out Shapes clips it prints, at each timestep t, the v-loss and the error of the
model's x̂0. The x̂0 error is shown beside two baselines: v = 0, and an all-black clip. At
t = 999 the input is pure noise, so an x̂0 error at the black baseline means the tokens
are ignored. It also prints the tokens' spread across clips (≈ 0 means collapsed tokens)
and the decoding error at guidance 1 and 3. Equal errors mean the condition has no effect.
Two more checks of the condition path: the x̂0 error when each clip is denoised with another
clip's tokens (equal to the own-token error = tokens unused), and the spread of the
de-tokenizer's cross-attention context across random token sets (≈ 0 = its resampler
no longer passes its input on). Last, whether the tokens carry colour to the drawing: for
single-object clips of a non-white colour, the mean hue of x̂0 inside the object, from pure
noise (t = 999) and from t = 500, is matched to the nearest non-white palette colour
(chance: 1 in 5).

With ``--partial`` it also asks at which noise level an attribute is lost: each clip is noised
to t, then the sampler (25 DDIM steps, guidance ``--guidance``) runs the rest of the way down,
and the probe reads colour, shape and direction from the result. An attribute kept from
t = 300 but lost from t = 700 is one that the low-noise steps draw well but that the tokens do
not supply (docs/TOKENIZER_TRAINING.md, finding 13).

With ``--x0-probe`` it probes the de-tokenizer's one-step x̂0 (the clip noised to t, its own
tokens) at t = 999 … 300, and the true clips blurred by a Gaussian of σ = 1, 1.5 and 2 pixels:
how much of each attribute the mean guess keeps, and how much blur the probe tolerates
(finding 14).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torchvision.transforms.v2.functional import gaussian_blur

from divot import config as cfglib
from divot import diffusion
from divot.autoencoder import VideoAutoencoder
from divot.modeling import WEIGHTS_NAME
from divot.probe import agreement_rates, probe_clip
from divot.shapes import COLORS, ShapesVideoDataset
from training.tokenizer_setup import TokenizerTrainConfig, init_model_overrides, load_init


def load(path: Path) -> VideoAutoencoder:
    """A finished run's models, or a training checkpoint's (read as ``init_from`` reads it)."""
    if (path / WEIGHTS_NAME).is_file():
        cfg = cfglib.from_dict(TokenizerTrainConfig, {"init_from": str(path), **init_model_overrides(path)})
        model = load_init(cfg)
        return VideoAutoencoder(model.tokenizer, model.detokenizer).eval()
    return VideoAutoencoder.from_pretrained(path)


def one_step_x0(det, x0: torch.Tensor, noise: torch.Tensor, t: int, tokens: torch.Tensor) -> torch.Tensor:
    """The de-tokenizer's x̂0, back in pixels, from ``x0`` (its own space) noised to ``t``."""
    tt = torch.full(x0.shape[:2], t)
    xt = diffusion.q_sample(x0, noise, tt, det.alphas_cumprod)
    return det.from_x(diffusion.x0_from_v(xt, det(xt, tt, tokens), tt, det.alphas_cumprod))


def hue_check(ae: VideoAutoencoder, ds: ShapesVideoDataset, clips: int, seed: int) -> None:
    """Is the object's colour in x̂0 where the tokens alone (or half-noised frames) must supply it?"""
    det, names = ae.detokenizer, [c for c in COLORS if c != "white"]
    palette = torch.tensor([COLORS[c] for c in names], dtype=torch.float32)
    palette = palette / palette.norm(dim=1, keepdim=True)
    colours = {}  # index → colour of the single-object, non-white clips, each clip drawn once
    for i in range(min(len(ds), 20 * clips)):
        objects = ds.world.clip(ds.split, i).objects
        if len(objects) == 1 and objects[0].color != "white":
            colours[i] = objects[0].color
        if len(colours) == clips:
            break
    picked, truth = list(colours), list(colours.values())
    video = torch.stack([ds[i]["video"] for i in picked])
    mask = (video > -0.9).any(2, keepdim=True).float()  # object pixels (b, f, 1, h, w)
    x0, tokens = det.to_x(video), ae.encode(video)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    for t in (999, 500):
        with torch.no_grad():
            pred = one_step_x0(det, x0, noise, t, tokens)
        rgb = (((pred + 1) / 2) * mask).sum((1, 3, 4)) / mask.sum((1, 3, 4))  # (b, 3) mean colour in the object
        guess = (torch.nn.functional.normalize(rgb, dim=1) @ palette.T).argmax(1)
        right = sum(names[g] == c for g, c in zip(guess.tolist(), truth))
        print(f"object hue in x0 at t={t:4d}: right in {right} of {len(picked)} single-object clips "
              f"(nearest of the {len(names)} non-white colours; chance {1 / len(names):.2f})")


def probe_scores(videos: torch.Tensor, truth) -> str:
    """The probe's agreement with ``truth`` over ``videos`` in [-1, 1], as one line of text."""
    score = agreement_rates([probe_clip(v) for v in videos.clamp(-1, 1)], truth)
    return (f"probe agreement {score['all']:.3f} (colour {score['color']:.3f}, shape {score['shape']:.3f}, "
            f"direction {score['direction']:.3f})")


def held_out_clips(ds: ShapesVideoDataset, clips: int) -> tuple[torch.Tensor, list]:
    return torch.stack([ds[i]["video"] for i in range(clips)]), [ds.world.clip(ds.split, i) for i in range(clips)]


@torch.no_grad()
def partial_sampling(ae: VideoAutoencoder, ds: ShapesVideoDataset, clips: int, guidance: float,
                     seed: int, starts=(999, 700, 500, 300, 150)) -> None:
    """Probe agreement of samples that start from the real clip noised to each level in ``starts``."""
    det = ae.detokenizer
    video, truth = held_out_clips(ds, clips)
    tokens = ae.encode(video)
    sched = diffusion.make_sampler(det.config.noise, "ddim")  # only to name the level reached
    sched.set_timesteps(25)
    for start in starts:
        out = det.decode(tokens, steps=25, guidance_scale=guidance, sampler="ddim", init_video=video,
                         init_t=start, generator=torch.Generator().manual_seed(seed))
        level = int(diffusion.timesteps_below(sched, start)[0])
        print(f"sampling from the clip noised to t={level:4d}: {probe_scores(out, truth)}")


@torch.no_grad()
def x0_probe(ae: VideoAutoencoder, ds: ShapesVideoDataset, clips: int, seed: int,
             levels=(999, 850, 700, 500, 300), sigmas=(1.0, 1.5, 2.0)) -> None:
    """The probe on the one-step x̂0 from each noise level (own tokens), and on blurred true clips.

    x̂0 is the de-tokenizer's mean guess of the clip: what it draws where the tokens leave
    something uncertain is a blur. The blurred clips show how much blur the probe's shape
    reading survives (docs/TOKENIZER_TRAINING.md, finding 14)."""
    det = ae.detokenizer
    video, truth = held_out_clips(ds, clips)
    tokens, x0 = ae.encode(video), det.to_x(video)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    for t in levels:
        print(f"x0 in one step from t={t:4d}: {probe_scores(one_step_x0(det, x0, noise, t, tokens), truth)}")
    for sigma in sigmas:
        k = 2 * math.ceil(3 * sigma) + 1
        blurred = gaussian_blur(video.flatten(0, 1), [k, k], [sigma, sigma]).view_as(video)
        print(f"true clips blurred, sigma {sigma:.1f} px: {probe_scores(blurred, truth)}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="run directory with tokenizer/ and detokenizer/, or one of its "
                   "checkpoints/step_* directories")
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--partial", type=int, default=0, metavar="CLIPS",
                   help="also sample CLIPS clips from partly noised inputs (see above); 0 = skip")
    p.add_argument("--guidance", type=float, default=2.0, help="guidance scale of --partial")
    p.add_argument("--x0-probe", type=int, default=0, metavar="CLIPS",
                   help="also probe CLIPS clips' one-step x̂0 at several noise levels, and blurred true "
                   "clips; 0 = skip")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    ae = load(Path(args.checkpoint))
    det, acp = ae.detokenizer, ae.detokenizer.alphas_cumprod
    ds = ShapesVideoDataset("val", size=ae.frame_size)
    video = torch.stack([ds[i]["video"] for i in range(args.clips)])
    tokens = ae.encode(video)
    print(f"token spread across clips {tokens.std(0).mean():.4f} (within a clip {tokens.std(1).mean():.4f})")
    with torch.no_grad():
        # Does the de-tokenizer's own resampler still pass its input on? Its context for very
        # different (random) token sets; a spread near 0 means the condition path has closed.
        probe = torch.randn(4, *tokens.shape[1:], generator=torch.Generator().manual_seed(args.seed))
        with torch.random.fork_rng():  # leaves the draws below as they were
            torch.manual_seed(args.seed)
            fresh = type(det)(det.config).eval()  # same config, initial weights: the open reference
        print(f"context spread across random token sets {det.context(probe).std(0).mean():.4f} "
              f"(freshly initialised de-tokenizer: {fresh.context(probe).std(0).mean():.4f})")
    x0 = det.to_x(video)
    black = ((-1 - x0) ** 2).mean().item()
    b, f = x0.shape[:2]
    with torch.no_grad():
        for t in (999, 900, 700, 500, 300, 200, 100, 50, 10):
            noise = torch.randn_like(x0)
            tt = torch.full((b, f), t)
            xt = diffusion.q_sample(x0, noise, tt, acp)
            v = det(xt, tt, tokens)
            err = ((diffusion.x0_from_v(xt, v, tt, acp) - x0) ** 2).mean().item()
            # Each clip denoised with another clip's tokens: equal errors = tokens unused.
            v_other = det(xt, tt, tokens.roll(1, 0))
            other = ((diffusion.x0_from_v(xt, v_other, tt, acp) - x0) ** 2).mean().item()
            zero = ((diffusion.x0_from_v(xt, torch.zeros_like(v), tt, acp) - x0) ** 2).mean().item()
            vloss = ((v - diffusion.v_target(x0, noise, tt, acp)) ** 2).mean().item()
            print(f"t={t:4d}  v-loss {vloss:.3f}  x0 error {err:.4f}  (other clip's tokens: {other:.4f}, "
                  f"v=0: {zero:.4f}, all black: {black:.4f})")
        for g in (1.0, 3.0):
            out = det.decode(tokens, steps=25, guidance_scale=g, generator=torch.Generator().manual_seed(0))
            print(f"decode, guidance {g}: MSE {((out - video) ** 2).mean().item():.4f}")
    hue_check(ae, ds, 4 * args.clips, args.seed)
    test = ShapesVideoDataset("test", size=ae.frame_size)
    if args.partial:
        partial_sampling(ae, test, args.partial, args.guidance, args.seed)
    if args.x0_probe:
        x0_probe(ae, test, args.x0_probe, args.seed)


if __name__ == "__main__":
    main()
