"""One-step student vs. multi-step teacher: wall time and probe agreement on the same clips.

    python scripts/bench_one_step.py --teacher runs/tokenizer --student runs/distill
    python scripts/bench_one_step.py --teacher runs/tokenizer --student runs/distill \\
        --ablation runs/distill_spatial --clips 32 --threads 2 --output bench.json

Held-out Shapes clips (test split, as ``eval/reconstruction.py``) are encoded once by the
teacher run's frozen tokenizer; every de-tokenizer decodes those same tokens from the same
seed. The teacher runs ``--steps`` DDIM steps with classifier-free guidance
(``--guidance-scale``, rescale ``--guidance-rescale``; DESIGN.md §3: 50, 7.5, 0.7); a
student directory (``detokenizer/`` of ``training/distill_detokenizer.py``, or its run
directory) runs its single step. Reported per clip: U-Net time alone (summed over the
U-Net's own forward calls, timed by hooks), end-to-end time (tokenizer encode + context +
sampling + ``from_x``, with the encode time measured once and shared), the U-Net
evaluations made, and probe agreement (colour, shape and direction all read back right,
:mod:`divot.probe`). Every model first runs one untimed warm-up batch. Prints a markdown
table and the speed-ups; ``--output`` writes the same as JSON.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from divot import diffusion
from divot.detokenizer import DivotDetokenizer
from divot.modeling import CheckpointError
from divot.probe import probe_agrees, probe_clip
from divot.shapes import ShapesWorld, render
from divot.tokenizer import DivotTokenizer
from divot.video_io import to_tensor


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="runs/tokenizer", help="run dir with tokenizer/ and detokenizer/")
    p.add_argument("--student", required=True, help="one-step de-tokenizer dir (or a run dir holding detokenizer/)")
    p.add_argument("--ablation", default=None, help="optional second student, e.g. the spatial-heads-only one")
    p.add_argument("--clips", type=int, default=16, help="held-out Shapes clips")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=50, help="teacher sampling steps")
    p.add_argument("--sampler", default="ddim", choices=list(diffusion.SAMPLERS))
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--guidance-rescale", type=float, default=0.7)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def detokenizer_dir(path: str | Path) -> Path:
    path = Path(path)
    return path / "detokenizer" if (path / "detokenizer" / "config.json").is_file() else path


class UNetTimer:
    """Wall time and number of calls of a module's forward, via pre/post forward hooks."""

    def __init__(self, module: torch.nn.Module):
        self.seconds, self.calls, self._t0 = 0.0, 0, 0.0
        self._hooks = [module.register_forward_pre_hook(self._start), module.register_forward_hook(self._stop)]

    def _start(self, *_):
        self._t0 = time.perf_counter()

    def _stop(self, *_):
        self.seconds += time.perf_counter() - self._t0
        self.calls += 1

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def decode_all(model: DivotDetokenizer, tokens: torch.Tensor, args, kwargs: dict) -> tuple[torch.Tensor, float]:
    """All clips, in batches, from one seeded generator; returns videos and decode wall time."""
    g = torch.Generator().manual_seed(args.seed)
    out, t0 = [], time.perf_counter()
    for i in range(0, len(tokens), args.batch_size):
        out.append(model.decode(tokens[i:i + args.batch_size], generator=g, **kwargs))
    return torch.cat(out), time.perf_counter() - t0


def bench(name: str, model: DivotDetokenizer, tokens: torch.Tensor, clips: list, encode_s: float, args,
          kwargs: dict) -> dict:
    timer = UNetTimer(model.unet)
    decode_all(model, tokens[:args.batch_size], args, kwargs)  # warm-up, untimed
    timer.reset()
    videos, decode_s = decode_all(model, tokens, args, kwargs)
    timer.remove()
    agree = [probe_agrees(probe_clip(v), c) for v, c in zip(videos, clips)]
    n = len(clips)
    return {"model": name, "steps": kwargs.get("steps", 1), "guidance_scale": kwargs.get("guidance_scale", 1.0),
            "unet_s_per_clip": timer.seconds / n, "end_to_end_s_per_clip": (encode_s + decode_s) / n,
            "unet_evals_per_batch": timer.calls / -(-n // args.batch_size), "probe_agreement": float(np.mean(agree))}


def markdown(rows: list[dict], speedups: dict) -> str:
    lines = ["| model | steps | guidance | U-Net s/clip | end-to-end s/clip | U-Net evals/batch | probe agreement |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['steps']} | {r['guidance_scale']:g} | {r['unet_s_per_clip']:.4f} | "
                     f"{r['end_to_end_s_per_clip']:.4f} | {r['unet_evals_per_batch']:g} | {r['probe_agreement']:.3f} |")
    lines.append("")
    for name, s in speedups.items():
        lines.append(f"speed-up of {name} over the teacher: U-Net {s['unet']:.1f}×, "
                     f"end-to-end {s['end_to_end']:.1f}×")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher_run = Path(args.teacher)
    try:
        tokenizer = DivotTokenizer.from_pretrained(teacher_run / "tokenizer").eval()
        models = {"teacher": DivotDetokenizer.from_pretrained(teacher_run / "detokenizer").eval(),
                  "student": DivotDetokenizer.from_pretrained(detokenizer_dir(args.student)).eval()}
        if args.ablation:
            models["ablation (spatial heads)"] = DivotDetokenizer.from_pretrained(detokenizer_dir(args.ablation)).eval()
    except CheckpointError as e:
        raise SystemExit(f"error: {e}")
    for name, m in models.items():
        if name != "teacher" and not m.config.one_step:
            print(f"note: {name} is not marked one_step; it is still run with 1 step and no guidance")
    size = models["teacher"].config.frame_size
    world = ShapesWorld(seed=0, size=size)
    clips = [world.clip("test", i) for i in range(args.clips)]
    videos = torch.stack([to_tensor(render(c, size)) for c in clips])
    with torch.no_grad():
        tokenizer(videos[:args.batch_size])  # warm-up
        t0 = time.perf_counter()
        tokens = torch.cat([tokenizer(videos[i:i + args.batch_size]) for i in range(0, len(videos), args.batch_size)])
        encode_s = time.perf_counter() - t0
    teacher_kw = {"steps": args.steps, "guidance_scale": args.guidance_scale,
                  "guidance_rescale": args.guidance_rescale, "sampler": args.sampler}
    rows = [bench(name, m, tokens, clips, encode_s, args, teacher_kw if name == "teacher" else
                  {"steps": 1, "guidance_scale": 1.0}) for name, m in models.items()]
    teacher = rows[0]
    speedups = {r["model"]: {"unet": teacher["unet_s_per_clip"] / max(r["unet_s_per_clip"], 1e-12),
                             "end_to_end": teacher["end_to_end_s_per_clip"] / max(r["end_to_end_s_per_clip"], 1e-12)}
                for r in rows[1:]}
    print(markdown(rows, speedups))
    result = {"clips": args.clips, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
              "encode_s_per_clip": encode_s / args.clips, "rows": rows, "speedups": speedups}
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
