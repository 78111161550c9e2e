"""Which attributes do the tokens carry? Read colour, shape and direction back from them.

    python scripts/probe_tokens.py runs/tokenizer/tokenizer          # a trained tokenizer
    python scripts/probe_tokens.py --fresh                            # the tiny preset, random weights
    python scripts/probe_tokens.py --fresh --set pool_size=8          # ... with a preset field changed

For single-object Shapes training clips it encodes each clip, keeps what the tokenizer holds at
each ``--stage`` (``vit``: the ViT's patch features of the first frame; ``resampler``: the input
of the Perceiver resampler; ``tokens``: the 64 output tokens), and fits four read-outs per
attribute on all but the last ``--test`` clips, scored on those: ``linear``, a linear classifier
on the features flattened; ``set``, one MLP shared by every position, then the maximum over
positions (it finds a shape wherever the object is, as a CNN does on pixels); ``pooled``, a
linear classifier on the mean over positions (what a per-token projector and even attention
hand on); ``mixed``, a linear classifier on one learned combination of the positions,
``W Σ_j m_j x_j`` (what one token of the LLM input projector's token mixing can hand on,
``llm/projectors.py``). Every feature is
standardised per position on the training clips, so the set read-out does not have to see past
a position's constant offset. All train with AdamW for a fixed number of steps; no early
stopping on the test clips. Chance is 1 / number of classes. A de-tokenizer cannot draw what the
tokens do not hold (docs/TOKENIZER_TRAINING.md, finding 13). The last line is one JSON object.

Axes: b = clips, f = frames, l = patches, n = positions (tokens), d = width.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import nn
from tqdm import tqdm

from divot import config as cfglib
from divot import presets
from divot.shapes import COLORS, DIRECTIONS, SHAPES, ShapesWorld, render
from divot.tokenizer import DivotTokenizer
from divot.video_io import to_tensor

ATTRIBUTES = {"color": tuple(COLORS), "shape": SHAPES, "direction": DIRECTIONS}


def single_object_clips(world: ShapesWorld, count: int, size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``count`` single-object training clips (b, f, 3, size, size) and their labels per attribute."""
    videos, labels, i = [], {k: [] for k in ATTRIBUTES}, 0
    while len(videos) < count:
        clip = world.clip("train", i)
        i += 1
        if len(clip.objects) != 1:
            continue
        obj = clip.objects[0]
        videos.append(to_tensor(render(clip, size)))
        for name, classes in ATTRIBUTES.items():
            labels[name].append(classes.index(getattr(obj, name)))
    return torch.stack(videos), {k: torch.tensor(v) for k, v in labels.items()}


STAGES = ("vit", "resampler", "tokens")


@torch.no_grad()
def encode(tokenizer: DivotTokenizer, videos: torch.Tensor, stages: list[str],
           batch: int = 64) -> dict[str, torch.Tensor]:
    """{stage: (b, n, d)} for every clip; inner stages are caught with forward hooks."""
    caught, out = {}, {k: [] for k in stages}
    resampler = tokenizer.image_proj_model.down_sampler
    hooks = [tokenizer.vit.register_forward_hook(lambda m, i, o: caught.__setitem__("vit", o)),
             resampler.register_forward_pre_hook(lambda m, i: caught.__setitem__("resampler", i[0]))]
    try:
        for k in tqdm(range(0, len(videos), batch), desc="encode"):
            clips = videos[k:k + batch]
            caught["tokens"] = tokenizer(clips)
            caught["vit"] = rearrange(caught["vit"], "(b f) l d -> b f l d", b=len(clips))[:, 0]
            for stage in stages:
                out[stage].append(caught[stage])
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v) for k, v in out.items()}


class SetReadout(nn.Module):
    """(b, n, d) → class logits: one MLP per position, shared, then the maximum over positions."""

    def __init__(self, dim: int, classes: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.out = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.mlp(x).amax(dim=1))


class MixedReadout(nn.Module):
    """(b, n, d) → class logits from ``Σ_j m_j x_j``; m starts as the mean over positions."""

    def __init__(self, positions: int, dim: int, classes: int):
        super().__init__()
        self.m = nn.Parameter(torch.full((positions,), 1.0 / positions))
        self.out = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(einsum(self.m, x, "n, b n d -> b d"))


class Mean(nn.Module):
    """(b, n, d) → (b, d): the mean over positions."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1)


READOUTS = ("linear", "set", "pooled", "mixed")


def make_readout(kind: str, x: torch.Tensor, classes: int, hidden: int) -> nn.Module:
    """A read-out of (b, n, d) features; ``linear`` flattens them itself."""
    if kind == "linear":
        return nn.Sequential(nn.Flatten(1), nn.Linear(x[0].numel(), classes))
    if kind == "set":
        return SetReadout(x.shape[-1], classes, hidden)
    if kind == "pooled":
        return nn.Sequential(Mean(), nn.Linear(x.shape[-1], classes))
    if kind == "mixed":
        return MixedReadout(x.shape[1], x.shape[-1], classes)
    raise ValueError(f"unknown read-out {kind!r}; choose from {READOUTS}")


def fit_readout(x: torch.Tensor, y: torch.Tensor, test: int, kind: str, hidden: int, steps: int,
                seed: int) -> float:
    """Test accuracy of a read-out (see :data:`READOUTS`) fitted on all but the last ``test`` clips."""
    torch.manual_seed(seed)
    train = x[:-test]
    x = (x - train.mean(0)) / (train.std(0) + 1e-5)  # per position and channel, training clips only
    net = make_readout(kind, x, int(y.max()) + 1, hidden)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.05)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x) - test, (256,), generator=gen)
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (net(x[-test:]).argmax(1) == y[-test:]).float().mean().item()


def load_tokenizer(args) -> DivotTokenizer:
    if args.fresh:
        torch.manual_seed(args.seed)
        return DivotTokenizer(presets.tokenizer_config(args.preset, **cfglib.parse_overrides(args.set)))
    if args.set:
        raise SystemExit("--set changes the preset of a --fresh tokenizer; a saved one keeps its config")
    return DivotTokenizer.from_pretrained(args.tokenizer)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tokenizer", nargs="?", help="a saved tokenizer directory (RUN/tokenizer)")
    p.add_argument("--fresh", action="store_true", help="a randomly initialised tokenizer of --preset")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                   help="a tokenizer config field for --fresh, e.g. pool_size=8 or vit.depth=4 (repeatable)")
    p.add_argument("--clips", type=int, default=3000, help="single-object clips in all")
    p.add_argument("--test", type=int, default=500, help="of which held out for scoring")
    p.add_argument("--stage", action="append", choices=STAGES, default=None,
                   help="where to read (repeatable; default: tokens)")
    p.add_argument("--readout", action="append", choices=READOUTS, default=None,
                   help="which read-outs (repeatable; default: all)")
    p.add_argument("--hidden", type=int, default=256, help="set read-out hidden width")
    p.add_argument("--steps", type=int, default=600, help="AdamW steps of 256 clips per read-out")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if bool(args.fresh) == bool(args.tokenizer):
        p.error("name a saved tokenizer directory or pass --fresh (not both)")
    if not 0 < args.test < args.clips:
        p.error("--test must be between 0 and --clips")
    tokenizer = load_tokenizer(args).eval()
    size = tokenizer.config.vit.img_size
    videos, labels = single_object_clips(ShapesWorld(seed=args.seed, size=size), args.clips, size)
    stages = args.stage or ["tokens"]
    feats = encode(tokenizer, videos, stages)
    report = {"tokenizer": args.tokenizer or f"fresh {args.preset} {' '.join(args.set)}".strip(),
              "clips": args.clips, "test": args.test}
    for stage, x in feats.items():
        for name, y in labels.items():
            chance = 1 / len(ATTRIBUTES[name])
            acc = {kind: fit_readout(x, y, args.test, kind, args.hidden, args.steps, args.seed)
                   for kind in args.readout or READOUTS}
            shown = "  ".join(f"{kind} {a:.3f}" for kind, a in acc.items())
            print(f"{stage:9s} {name:9s} {shown}  (chance {chance:.3f})")
            report.setdefault(stage, {})[name] = {k: round(v, 4) for k, v in acc.items()}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
