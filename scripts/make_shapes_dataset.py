#!/usr/bin/env python
"""Write the Shapes world to disk in the formats users' own data uses.

    python scripts/make_shapes_dataset.py OUT [--num-train N --num-val N
        --num-test N --size 64 --seed 0]

Produces
  OUT/captions/videos/<split>_<index>.mp4
  OUT/captions/{train,val,test}.jsonl   {"video": "videos/...", "caption", "heldout"}
  OUT/egoschema/questions.json          EgoSchema release layout, test split
  OUT/egoschema/subset_answers.json     {q_uid: answer index}
  OUT/egoschema/videos/<q_uid>.mp4
so that the caption-list loaders and the EgoSchema evaluation run on it
unchanged. Every item comes from ShapesWorld(seed), so reruns are identical.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

from tqdm import tqdm

# Runnable from a source checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from divot.shapes import ShapesWorld  # noqa: E402
from divot.video_io import CLIP_FPS, write_video  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-val", type=int, default=128)
    parser.add_argument("--num-test", type=int, default=256)
    parser.add_argument("--size", type=int, default=64, help="frame side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("num_train", "num_val", "num_test"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
    return args


def write_caption_split(world: ShapesWorld, out: Path, split: str, count: int) -> int:
    """Videos plus OUT/captions/<split>.jsonl; returns how many are held-out."""
    heldout = 0
    lines = []
    for index in tqdm(range(count), desc=f"captions/{split}", unit="clip"):
        item = world.sample(split, index)
        name = f"videos/{split}_{index:06d}.mp4"
        write_video(out / "captions" / name, item["video"], fps=CLIP_FPS)
        heldout += item["clip"].heldout
        lines.append(json.dumps({"video": name, "caption": item["caption"],
                                 "heldout": item["clip"].heldout}))
    path = out / "captions" / f"{split}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return heldout


def write_egoschema(world: ShapesWorld, out: Path, count: int) -> Counter:
    """EgoSchema-style questions over the test split; returns the kinds asked."""
    root = out / "egoschema"
    questions, answers, kinds = [], {}, Counter()
    for index in tqdm(range(count), desc="egoschema", unit="clip"):
        item = world.sample("test", index)
        q_uid = f"shapes-test-{index:06d}"
        question = item["question"]
        write_video(root / "videos" / f"{q_uid}.mp4", item["video"], fps=CLIP_FPS)
        record = {"q_uid": q_uid, "question": question["question"]}
        record.update({f"option {i}": text for i, text in enumerate(question["options"])})
        record.update({"kind": question["kind"], "heldout": item["clip"].heldout,
                       "num_objects": len(item["clip"].objects)})
        questions.append(record)
        answers[q_uid] = question["answer"]
        kinds[question["kind"]] += 1
    root.mkdir(parents=True, exist_ok=True)
    (root / "questions.json").write_text(json.dumps(questions, indent=1), encoding="utf-8")
    (root / "subset_answers.json").write_text(json.dumps(answers, indent=1), encoding="utf-8")
    return kinds


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    world = ShapesWorld(seed=args.seed, size=args.size)
    start = time.perf_counter()
    counts = {"train": args.num_train, "val": args.num_val, "test": args.num_test}
    heldout = {split: write_caption_split(world, args.out, split, n) for split, n in counts.items()}
    kinds = write_egoschema(world, args.out, args.num_test)
    print(f"wrote Shapes dataset to {args.out} in {time.perf_counter() - start:.1f} s "
          f"(size {args.size}, seed {args.seed})")
    for split, n in counts.items():
        print(f"  captions/{split}.jsonl: {n} clips, {heldout[split]} with a held-out pair")
    print(f"  egoschema: {args.num_test} questions; kinds: "
          + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
