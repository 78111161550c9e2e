"""Can the SF-V discriminator see what separates one-step clips from real ones? Per-tap separability.

    python scripts/diagnose_discriminator.py                          # teacher runs/tokenizer, in one step
    python scripts/diagnose_discriminator.py --student runs/distill   # a distilled generator's clips
    python scripts/diagnose_discriminator.py --teacher RUN --clips 16 --timesteps 20,100,300,700

The discriminator of ``training/distill_detokenizer.py`` (:mod:`divot.discriminator`) trains
small heads on the frozen teacher U-Net's encoder features. Its heads can only learn what those
features show. For held-out Shapes clips this script makes the generator's one-step clips
(x̂0 from pure noise, t = 999: what inference uses), noises real and generated clips with the
same noise at each discriminator timestep t', and compares what D is given at every tap:
the U-Net's input (after the teacher's own input preparation) and the output of each encoder
block (the features its heads read).

The figure per tap is the mean over channels of E[(real − fake)²] / Var(real): the share of a
channel's variance that the real/fake difference accounts for, 0 when the two are the same.
A tap whose figure is far below the input's hides most of the difference from its heads
(docs/RESULTS.md, one-step section). The last line is one JSON object.

Axes: b = batch, f = frames, c = channels, h, w = height, width.
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from einops import rearrange

from divot import diffusion, distill
from divot.detokenizer import DivotDetokenizer
from divot.discriminator import Discriminator
from divot.shapes import ShapesVideoDataset
from divot.tokenizer import DivotTokenizer


def separability(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Mean over channels (dim 1) of E[(real − fake)²] / Var(real), features ((b f), c, …)."""
    r, f = rearrange(real.float(), "n c ... -> c (n ...)"), rearrange(fake.float(), "n c ... -> c (n ...)")
    return ((r - f).pow(2).mean(dim=1) / r.var(dim=1).clamp_min(1e-8)).mean().item()


@torch.no_grad()
def tap_features(disc: Discriminator, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> list[torch.Tensor]:
    """[U-Net input ((b f), c, h, w), then each encoder block's output], as D sees them."""
    sample, t_in, ctx = disc.unet_inputs(x_t, t, context)
    return [rearrange(sample, "b f c h w -> (b f) c h w"), *disc.encode(sample, t_in, ctx)]


@torch.no_grad()
def measure(disc: Discriminator, generator: DivotDetokenizer, tokenizer: DivotTokenizer, video: torch.Tensor,
            timesteps: list[int], seed: int = 0) -> dict[int, list[float]]:
    """{t': [separability at the input, at encoder block 0, 1, …]} for clips ``video`` (b, f, 3, H, W)."""
    g = torch.Generator().manual_seed(seed)
    tokens = tokenizer(video)
    x0 = generator.to_x(video)
    last = generator.config.noise.num_train_timesteps - 1
    noise = torch.randn(x0.shape, generator=g)
    fake = distill.generate_x0(generator, x0, tokens, torch.full((len(x0),), last), noise=noise)
    context = disc.context(tokens)
    out = {}
    for t in timesteps:
        tt = torch.full(x0.shape[:2], t)
        eps = torch.randn(x0.shape, generator=g)
        real_t = diffusion.q_sample(x0, eps, tt, disc.front.alphas_cumprod)
        fake_t = diffusion.q_sample(fake, eps, tt, disc.front.alphas_cumprod)
        out[t] = [separability(a, b) for a, b in zip(tap_features(disc, real_t, tt, context),
                                                      tap_features(disc, fake_t, tt, context))]
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="runs/tokenizer", help="tokenizer run (tokenizer/ and detokenizer/)")
    p.add_argument("--student", default=None, help="a distilled run or detokenizer dir whose one-step clips are "
                   "the fakes (default: the teacher itself, run in one step)")
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--timesteps", default="20,100,300", help="discriminator noise levels t'")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    run = Path(args.teacher)
    tokenizer = DivotTokenizer.from_pretrained(run / "tokenizer").eval()
    teacher = DivotDetokenizer.from_pretrained(run / "detokenizer").eval()
    student = Path(args.student) if args.student else None
    if student is not None and (student / "detokenizer").is_dir():
        student = student / "detokenizer"
    generator = DivotDetokenizer.from_pretrained(student).eval() if student else copy.deepcopy(teacher)
    disc = Discriminator(teacher).eval()
    ds = ShapesVideoDataset("test", size=teacher.config.frame_size, seed=args.seed)
    video = torch.stack([ds[i]["video"] for i in range(args.clips)])
    timesteps = [int(t) for t in args.timesteps.split(",")]
    result = measure(disc, generator, tokenizer, video, timesteps, args.seed)
    names = ["input"] + [f"block {i}" for i in range(len(next(iter(result.values()))) - 1)]
    print(f"separability of real and one-step clips ({args.clips} test clips; "
          f"fakes from {student or 'the teacher in one step'}), E[(real-fake)^2]/Var(real) per channel:")
    print("| t' | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for t, row in result.items():
        print(f"| {t} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    summary = {"taps": names, "separability": {str(t): row for t, row in result.items()}, "clips": args.clips}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
