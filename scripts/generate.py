#!/usr/bin/env python
"""Generate a video (2 seconds, or --seconds N) from a text prompt with Divot-LLM and its de-tokenizer.

    python scripts/generate.py "a red circle moves to the left" -o out.mp4
        [--checkpoint DIR] [--seed N] [--steps 25] [--guidance-scale 3.0] [--gif]
        [--seconds 8 --known-method guidance --overlap 4 --guidance-weight 2.0]

The prompt is asked as in training ("Generate a video of …"). Prints where it wrote.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Runnable from a source checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from divot import diffusion  # noqa: E402
from divot.modeling import CheckpointError  # noqa: E402
from llm.pipeline import GENERATION_CHECKPOINTS, PromptTooLongError, find_checkpoint, load  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompt", help="what the video shows, e.g. 'a red circle moves to the left'")
    parser.add_argument("-o", "--output", type=Path, default=Path("generated.mp4"),
                        help="output file; .mp4/.webm/.mkv/.avi/.mov or .gif (default generated.mp4)")
    parser.add_argument("--gif", action="store_true", help="write a GIF (replaces the output's extension)")
    parser.add_argument("--checkpoint", default=None,
                        help="Divot-LLM checkpoint (default: runs/llm_sft_gen/final, else llm_pretrain, else llm_sft_comp)")
    parser.add_argument("--detokenizer", default=None, help="de-tokenizer dir (default: the checkpoint's)")
    parser.add_argument("--tokenizer", default=None, help="Divot tokenizer dir (default: the checkpoint's)")
    parser.add_argument("--device", default=None, help="e.g. cuda, cpu (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="LLM dtype, e.g. bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=25, help="de-tokenizer sampling steps")
    parser.add_argument("--guidance-scale", type=float, default=3.0, help="classifier-free guidance scale")
    parser.add_argument("--guidance-rescale", type=float, default=0.7)
    parser.add_argument("--sampler", default="ddim", choices=list(diffusion.SAMPLERS))
    parser.add_argument("--variance-scale", type=float, default=None,
                        help="GMM sampling variance scale (default: the model's, 0.1)")
    parser.add_argument("--use-mean", action="store_true", help="take the GMM mixture mean instead of sampling")
    parser.add_argument("--seconds", type=float, default=None,
                        help="video length; beyond 2 s each further clip continues the previous one (default: 2)")
    parser.add_argument("--overlap", type=int, default=4, help="frames each further clip continues (--seconds)")
    parser.add_argument("--known-method", default="guidance", choices=["guidance", "replacement", "clean"],
                        help="how a further clip keeps the overlap frames (--seconds; default guidance)")
    parser.add_argument("--guidance-weight", type=float, default=2.0, help="reconstruction guidance weight w_r")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    if args.seconds is not None and args.seconds <= 0:
        parser.error("--seconds must be > 0")
    if not 0 <= args.overlap < 16:
        parser.error("--overlap must be in [0, 16) frames (a clip has 16)")
    if args.gif:
        args.output = args.output.with_suffix(".gif")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        checkpoint = args.checkpoint or find_checkpoint(candidates=GENERATION_CHECKPOINTS)
        pipe = load(checkpoint, tokenizer=args.tokenizer, detokenizer=args.detokenizer,
                    device=args.device, dtype=args.dtype)
        video = pipe.generate_video(args.prompt, seed=args.seed, steps=args.steps, guidance_scale=args.guidance_scale,
                                    guidance_rescale=args.guidance_rescale, sampler=args.sampler,
                                    variance_scale=args.variance_scale, use_mean=args.use_mean, seconds=args.seconds,
                                    overlap=args.overlap, known_method=args.known_method,
                                    guidance_weight=args.guidance_weight)
    except (CheckpointError, PromptTooLongError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    path = video.save(args.output)
    f, h, w = video.frames.shape[:3]
    print(f"wrote {path} ({f} frames, {w}x{h}, {video.fps:g} fps; Divot-LLM {pipe.checkpoint})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
