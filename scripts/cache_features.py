#!/usr/bin/env python
"""Precompute the frozen Divot tokenizer's tokens of every training clip into a feature cache.

    python scripts/cache_features.py --tokenizer runs/tokenizer/tokenizer --out CACHE
        (--shapes-split train --num N [--seed 0] | --jsonl FILE | --conversations FILE)
        [--video-root DIR] [--batch-size 16] [--max-clips 4] [--device cpu]
        [--shard-size 1024] [--frame-size S]

The cache (llm/features.py) is what ``ClipFeatures(cache_dir=CACHE)`` reads during LLM
training. Resumable: keys already stored are skipped, and shards are written atomically, so
an interrupted run loses at most the clips of its unfinished shard. A jsonl caches both the
clips a caption sample shows (up to --max-clips per video) and the first clip a generation
sample targets. --frame-size defaults to the frame size the tokenizer was trained at.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm

# Runnable from a source checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from divot.video_io import VideoReadError  # noqa: E402
from llm.data_sources import (  # noqa: E402
    DEFAULT_MAX_CLIPS,
    CaptionJsonlSource,
    ConversationSource,
    ShapesCaptionSource,
    iter_video_refs,
)
from llm.features import load_clip_features  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", required=True, type=Path, help="trained tokenizer directory")
    p.add_argument("--out", required=True, type=Path, help="feature cache directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--shapes-split", choices=("train", "val", "test"), help="Shapes world split")
    src.add_argument("--jsonl", type=Path, help='caption list, one {"video", "caption"} per line')
    src.add_argument("--conversations", type=Path, help="LLaVA-style conversation json")
    p.add_argument("--num", type=int, help="Shapes clips to cache (with --shapes-split)")
    p.add_argument("--seed", type=int, default=0, help="Shapes world seed")
    p.add_argument("--video-root", type=Path, help="folder relative video paths resolve against")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-clips", type=int, default=DEFAULT_MAX_CLIPS, help="2-s clips per video at most")
    p.add_argument("--device", default="cpu")
    p.add_argument("--shard-size", type=int, default=1024, help="clips per shard file")
    p.add_argument("--frame-size", type=int, help="frame side fed to the tokenizer")
    args = p.parse_args(argv)
    if args.shapes_split and (args.num is None or args.num < 1):
        p.error("--shapes-split needs --num N (N >= 1)")
    for name in ("batch_size", "max_clips", "shard_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def build_source(args: argparse.Namespace):
    if args.shapes_split:
        return ShapesCaptionSource(args.shapes_split, length=args.num, seed=args.seed)
    if args.jsonl:
        return CaptionJsonlSource(args.jsonl, args.video_root, tasks=("caption", "generate"),
                                  max_clips=args.max_clips)
    return ConversationSource(args.conversations, args.video_root, max_clips=args.max_clips)


def compute(features, refs, batch_size: int) -> list[str]:
    """Encode ``refs`` into the cache; returns the paths that could not be read."""
    bad: list[str] = []
    with tqdm(total=len(refs), desc="caching clip features", unit="clip") as bar:
        for start in range(0, len(refs), batch_size):
            chunk = refs[start:start + batch_size]
            try:
                features(chunk)
            except VideoReadError:
                # Find the unreadable file(s) one ref at a time; the rest still get cached.
                for ref in chunk:
                    try:
                        features([ref])
                    except VideoReadError as exc:
                        bad.append(exc.path)
            bar.update(len(chunk))
    return sorted(set(bad))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    kwargs = {"frame_size": args.frame_size} if args.frame_size else {}
    features = load_clip_features(args.tokenizer, args.out, args.device, batch_size=args.batch_size,
                                  write=True, shard_size=args.shard_size, **kwargs)
    unique = {ref.key: ref for ref in tqdm(iter_video_refs(build_source(args)), desc="listing clips",
                                           unit="clip")}
    todo = [ref for key, ref in unique.items() if key not in features.cache]
    print(f"{len(unique)} clips, {len(unique) - len(todo)} already cached, {len(todo)} to compute "
          f"(frame size {features.frame_size})")
    before = len(features.cache)
    try:
        bad = compute(features, todo, args.batch_size)
    finally:
        features.flush()  # also on Ctrl-C: keep what was computed
    print(f"wrote {len(features.cache) - before} clips to {args.out} in {time.perf_counter() - start:.1f} s; "
          f"cache holds {len(features.cache)} clips")
    if bad:
        print(f"{len(bad)} unreadable videos skipped, e.g. {bad[:3]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
