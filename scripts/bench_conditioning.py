#!/usr/bin/env python
"""Benchmark known-frame conditioning and long-video extension on held-out Shapes clips.

    python scripts/bench_conditioning.py [runs/tokenizer] [--num-clips 16] [--steps 25]
        [--methods clean,replacement,guidance] [--guidance-weight 2.0] [--k 4]
        [--long-videos 4] [--seconds 8] [--overlap 4] [--long-methods guidance,replacement]
        [--output bench_conditioning.json]

(a) Tasks: for every task (video, image_to_video, prediction with the first ``--k``
frames, interpolation) and known-frame method, each test clip's tokens are decoded
with the task's frames given. Reported: probe agreement of the result with the clip's
attributes (colour, shape, direction), PSNR of the generated (unknown) frames against
the clip, and the largest absolute error on the known frames (should be 0 in pixel
space). (b) Long videos: a test clip's objects are slowed to cross the canvas over
``--seconds`` (8 fps); the long clip is cut into 2-second windows that overlap by
``--overlap`` frames, each window is tokenized, and :func:`divot.long_video.extend_video`
rebuilds one video from the windows' tokens with each method (same seeds).
:func:`divot.long_video.join_continuity` measures the joins: pixel MSE and probe-track
jump across a join relative to the mean within-clip step (1 ≈ as smooth as within a
clip); the real long clip is the reference row. Prints markdown tables; ``--output``
writes the numbers as JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

# Runnable from a source checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from divot import diffusion, metrics  # noqa: E402
from divot.autoencoder import VideoAutoencoder  # noqa: E402
from divot.conditioning import KNOWN_METHODS, TASKS, task_mask  # noqa: E402
from divot.long_video import clips_needed, extend_video, join_continuity, join_indices  # noqa: E402
from divot.probe import probe_agrees, probe_clip  # noqa: E402
from divot.shapes import ShapesClip, ShapesWorld, render  # noqa: E402
from divot.video_io import CLIP_FPS, to_tensor  # noqa: E402
from eval.reconstruction import load_run  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", nargs="?", default="runs/tokenizer", help="run dir with tokenizer/ and detokenizer/")
    p.add_argument("--num-clips", type=int, default=16, help="held-out Shapes clips per task")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--sampler", default="ddim", choices=list(diffusion.SAMPLERS))
    p.add_argument("--guidance-scale", type=float, default=None, help="default: the run's config.yaml, else 7.5")
    p.add_argument("--guidance-rescale", type=float, default=0.7)
    p.add_argument("--methods", default="clean,replacement,guidance", help="known-frame methods for the tasks")
    p.add_argument("--guidance-weight", type=float, default=2.0, help="reconstruction guidance weight w_r")
    p.add_argument("--k", type=int, default=4, help="known first frames for prediction")
    p.add_argument("--long-videos", type=int, default=4, help="long videos per method (0: skip part b)")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--overlap", type=int, default=4)
    p.add_argument("--long-methods", default="guidance,replacement")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=None, help="write the results as JSON")
    args = p.parse_args(argv)
    for name in ("methods", "long_methods"):
        value = [m.strip() for m in getattr(args, name).split(",") if m.strip()]
        unknown = sorted(set(value) - set(KNOWN_METHODS))
        if unknown:
            p.error(f"--{name.replace('_', '-')}: unknown method(s) {unknown}; choose from {list(KNOWN_METHODS)}")
        setattr(args, name, value)
    return args


def decode_kw(args) -> dict:
    return dict(steps=args.steps, sampler=args.sampler, guidance_scale=args.guidance_scale,
                guidance_rescale=args.guidance_rescale, guidance_weight=args.guidance_weight)


def task_rows(model: VideoAutoencoder, args) -> list[dict]:
    """Part (a): one row per (task, method); "video" has no known frames, so one row."""
    world = ShapesWorld(seed=0, size=model.frame_size)
    clips = [world.clip("test", i) for i in range(args.num_clips)]
    videos = torch.stack([to_tensor(render(c, model.frame_size)) for c in clips])
    tokens = torch.cat([model.encode(videos[i:i + args.batch_size]) for i in range(0, len(videos), args.batch_size)])
    f = videos.shape[1]
    rows = []
    for task in TASKS:
        mask = task_mask(task, f, args.k)
        for method in (["-"] if task == "video" else args.methods):
            t0, out = time.time(), []
            g = torch.Generator().manual_seed(args.seed)
            for i in range(0, len(videos), args.batch_size):
                batch = videos[i:i + args.batch_size]
                known = None if task == "video" else (mask, batch)
                out.append(model.detokenizer.decode(tokens[i:i + args.batch_size], generator=g, known_frames=known,
                                                    known_method=method if known is not None else "clean",
                                                    **decode_kw(args)))
            gen = torch.cat(out)
            agree = [probe_agrees(probe_clip(v), c) for v, c in zip(gen, clips)]
            rows.append({"task": task, "method": method, "probe_agreement": float(np.mean(agree)),
                         "psnr_unknown": metrics.psnr(gen[:, ~mask], videos[:, ~mask]).mean().item(),
                         "known_max_abs_error": float((gen - videos)[:, mask].abs().max()) if mask.any() else None,
                         "num_clips": len(clips), "seconds": round(time.time() - t0, 1)})
            print(f"  {task} / {method}: probe {rows[-1]['probe_agreement']:.3f}", flush=True)
    return rows


def long_clip(clip: ShapesClip, num_frames: int) -> ShapesClip:
    """The clip's paths, slowed so the objects cover over ``num_frames`` what they covered
    over the clip (so they stay on the canvas)."""
    scale = (clip.num_frames - 1) / (num_frames - 1)
    return ShapesClip(tuple(dataclasses.replace(o, speed=o.speed * scale) for o in clip.objects), num_frames)


def long_rows(model: VideoAutoencoder, args) -> list[dict]:
    """Part (b): join continuity of extended videos per method, and of the real long clips."""
    f = model.detokenizer.config.num_frames
    k = clips_needed(round(args.seconds * CLIP_FPS), f, args.overlap)
    total, joins, stride = f + (k - 1) * (f - args.overlap), join_indices(k, f, args.overlap), f - args.overlap
    world = ShapesWorld(seed=0, size=model.frame_size)
    real, per_method = [], {m: [] for m in args.long_methods}
    for i in range(args.long_videos):
        video = to_tensor(render(long_clip(world.clip("test", 1000 + i), total), model.frame_size))
        windows = torch.stack([video[j * stride:j * stride + f] for j in range(k)])
        tokens = model.encode(windows)
        real.append(join_continuity(video, joins))
        for method in args.long_methods:
            gen = extend_video(model.detokenizer, tokens, args.overlap, method, seed=args.seed + i, **decode_kw(args))
            per_method[method].append(join_continuity(gen, joins))
        print(f"  long video {i + 1}/{args.long_videos} done", flush=True)
    rows = [_summary("real clip", real, k, total)]
    rows += [_summary(m, per_method[m], k, total) for m in args.long_methods]
    return rows


def _mean(results: list[dict], key: str) -> float | None:
    values = [r[key] for r in results if r[key] is not None]
    return float(np.mean(values)) if values else None


def _summary(name: str, results: list[dict], clips: int, frames: int) -> dict:
    keys = ("pixel_ratio", "pixel_mse_join", "pixel_mse_within", "position_ratio", "position_jump_join",
            "position_step_within")
    return {"method": name, "clips": clips, "frames": frames, "videos": len(results),
            **{key: _mean(results, key) for key in keys}, "per_video": results}


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def markdown(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    model, args.guidance_scale = load_run(Path(args.checkpoint), args.guidance_scale)
    torch.manual_seed(args.seed)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result = {"settings": settings}
    print(f"(a) tasks on {args.num_clips} Shapes test clips, {args.steps} {args.sampler} steps")
    result["tasks"] = task_rows(model, args)
    print(markdown(result["tasks"], ["task", "method", "probe_agreement", "psnr_unknown", "known_max_abs_error",
                                     "num_clips", "seconds"]))
    if args.long_videos > 0:
        print(f"(b) {args.seconds:g}-second videos from 2-second windows (overlap {args.overlap})")
        result["long_video"] = long_rows(model, args)
        print(markdown(result["long_video"], ["method", "clips", "frames", "videos", "pixel_ratio", "pixel_mse_join",
                                              "position_ratio", "position_jump_join", "position_step_within"]))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
