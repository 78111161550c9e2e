"""Replication report: do generated videos copy training clips, in content or in motion?

    python eval/replication.py --generated runs/samples --tokenizer runs/tokenizer/tokenizer
    python eval/replication.py --checkpoint runs/llm_sft_gen/final --sscd sscd_disc_mixup.torchscript.pt
    python eval/replication.py --generated gen/ --train train_videos/ --sscd sscd.torchscript.pt

After "Frame by Familiar Frame" (DESIGN.md §6; method in :mod:`eval.copy_detection`): each
generated clip's content descriptor is compared with every training clip's by exact search;
reported are the mean top-1 similarity, the fraction at or above ``--threshold`` (default
0.5 for SSCD, the copy threshold of SSCD replication studies; 0.8 for the Divot-ViT stand-in,
calibrated on the planted test set) and the ``--worst`` most similar pairs written side by side
(generated | nearest training clip) to ``worst/``. Without ``--sscd`` the descriptor is the
Divot tokenizer's own ViT, labelled ``divot-vit (not SSCD)``: not comparable with published
numbers. Motion replication compares probe object trajectories (Shapes-world videos) and,
for any video, the frame-to-frame changes of the descriptors (``feature_motion_*``).

Generated clips: a folder of videos (``--generated``), or made here from the Shapes test
prompts (``--checkpoint``, ``--num-prompts``; written to ``generated/`` so a rerun reuses
them). Training clips: the Shapes train split (``--train shapes``, ``--num-train``, world seed
0 as the default runs), a folder of videos, or a ``.jsonl`` file of ``{"video": path}`` lines.
Each video's first 2-second clip (16 frames at 8 fps) is used. Per-clip features are cached in
``features/``; ``pairs.jsonl`` lists every generated clip's nearest training clips;
``metrics.json`` the summary. The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

# Runnable from a source checkout without installing the package.
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from divot.modeling import CheckpointError  # noqa: E402
from divot.shapes import ShapesWorld, render  # noqa: E402
from divot.video_io import (VIDEO_EXTENSIONS, VideoReadError, read_clip, resize_center_crop,  # noqa: E402
                            side_by_side, write_video)
from eval import copy_detection as cd  # noqa: E402
from eval.fvd import FeatureStore, file_stem  # noqa: E402
from eval.mc_core import require_positive  # noqa: E402
from eval.qa_io import check_settings, write_json  # noqa: E402

WORLD_SEED = 0  # the Shapes world the default runs train on
TRAIN_RENDER = 64  # Shapes training clips are rendered at the canvas size
HEADLINE = ("descriptor", "mean_top_similarity", "fraction_replicated", "threshold", "motion_mean_top_similarity",
            "motion_fraction_replicated", "num_generated", "num_train")


@dataclass(frozen=True)
class Clip:
    """One video clip: a stable ``uid`` (cache key) and how to get its uint8 (16, h, w, 3) frames."""
    uid: str
    load: Callable[[], np.ndarray]


# ------------------------------------------------------------------ the report
def describe(videos: Sequence[np.ndarray], descriptor: cd.FrameDescriptor) -> dict[str, np.ndarray]:
    """Per-clip features: raw frame descriptors (n, f, d) and motion tracks (n, k, t, 2)."""
    return {"frames": cd.frame_descriptors(videos, descriptor),
            "tracks": np.stack([cd.motion_tracks(v) for v in videos])}


def _fraction(values: np.ndarray, threshold: float) -> float | None:
    return float(np.mean(values >= threshold)) if len(values) else None


def summarize(gen: dict[str, np.ndarray], train: dict[str, np.ndarray], *, center: bool, threshold: float,
              motion_threshold: float = cd.MOTION_THRESHOLD, worst: int = 4) -> dict:
    """Metrics from :func:`describe` features of the generated and training sets.

    ``rows`` holds, per generated clip, its nearest training clip (content and motion);
    ``worst`` the indices of the ``worst`` most similar pairs, most similar first."""
    mean = train["frames"].reshape(-1, train["frames"].shape[-1]).mean(axis=0) if center else None
    sims, index = cd.nearest(cd.clip_descriptors(gen["frames"], mean), cd.clip_descriptors(train["frames"], mean))
    msims, mindex = cd.nearest_motion(gen["tracks"], train["tracks"])
    fsims, _ = cd.nearest(cd.motion_descriptors(gen["frames"], mean), cd.motion_descriptors(train["frames"], mean))
    scored = msims[np.isfinite(msims)]
    rows = [{"nearest": int(i), "similarity": float(s), "motion_nearest": int(mi),
             "motion_similarity": None if not np.isfinite(ms) else float(ms), "feature_motion_similarity": float(fs)}
            for i, s, mi, ms, fs in zip(index, sims, mindex, msims, fsims)]
    order = np.argsort(-sims, kind="stable")[:worst]
    return {"mean_top_similarity": float(sims.mean()), "median_top_similarity": float(np.median(sims)),
            "max_top_similarity": float(sims.max()), "fraction_replicated": _fraction(sims, threshold),
            "threshold": threshold, "num_replicated": int((sims >= threshold).sum()),
            "motion_mean_top_similarity": float(scored.mean()) if len(scored) else None,
            "motion_fraction_replicated": _fraction(scored, motion_threshold),
            "motion_threshold": motion_threshold, "motion_num_scored": int(len(scored)),
            "feature_motion_mean_top_similarity": float(fsims.mean()),
            "num_generated": len(sims), "num_train": len(train["frames"]), "rows": rows,
            "worst": [int(i) for i in order]}


def replication_report(generated_videos: Sequence[np.ndarray], train_videos: Sequence[np.ndarray],
                       descriptor: cd.FrameDescriptor, *, threshold: float | None = None,
                       motion_threshold: float = cd.MOTION_THRESHOLD, worst: int = 4) -> dict:
    """Content and motion replication of uint8 (t, h, w, 3) ``generated_videos`` against
    ``train_videos``, in memory (the script caches features on disk instead). ``descriptor``
    is an :class:`~eval.copy_detection.SSCDDescriptor` or a
    :class:`~eval.copy_detection.DivotViTDescriptor`; ``threshold`` defaults to its own."""
    is_sscd = isinstance(descriptor, cd.SSCDDescriptor)
    if threshold is None:
        threshold = cd.SSCD_THRESHOLD if is_sscd else cd.VIT_THRESHOLD
    result = summarize(describe(generated_videos, descriptor), describe(train_videos, descriptor),
                       center=not is_sscd, threshold=threshold, motion_threshold=motion_threshold, worst=worst)
    return {"descriptor": getattr(descriptor, "name", type(descriptor).__name__), **result}


# ------------------------------------------------------------------ clip sources
def _file_clip(uid: str, path: Path, size: int) -> Clip:
    return Clip(uid, lambda: read_clip(path, size=size))


def folder_clips(folder: Path, size: int, prefix: str) -> list[Clip]:
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"no videos ({', '.join(VIDEO_EXTENSIONS)}) under {folder}")
    return [_file_clip(f"{prefix}{p.relative_to(folder).as_posix()}", p, size) for p in files]


def jsonl_clips(path: Path, size: int) -> list[Clip]:
    clips = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} line {number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("video"), str):
            raise ValueError(f"{path} line {number}: expected {{\"video\": path}}, got {line.strip()[:80]}")
        video = Path(record["video"])
        clips.append(_file_clip(f"train/{record['video']}", video if video.is_absolute() else path.parent / video,
                                size))
    if not clips:
        raise ValueError(f"{path}: no {{\"video\": path}} lines")
    return clips


def train_clips(spec: str, num_train: int | None, size: int) -> tuple[list[Clip], str]:
    """Training clips for ``--train`` and a description of them."""
    if spec == "shapes":
        world, count = ShapesWorld(seed=WORLD_SEED), num_train or 1000
        return ([Clip(f"train-{i}", lambda i=i: render(world.clip("train", i), TRAIN_RENDER)) for i in range(count)],
                f"Shapes train clips 0..{count - 1} (world seed {WORLD_SEED}) rendered at {TRAIN_RENDER}px")
    path = Path(spec)
    if path.is_dir():
        clips = folder_clips(path, size, "train/")
    elif path.is_file() and path.suffix == ".jsonl":
        clips = jsonl_clips(path, size)
    else:
        raise FileNotFoundError(f"--train '{spec}' is neither 'shapes', a folder of videos nor a .jsonl file")
    return clips[:num_train], f"first 2-second clip of {len(clips[:num_train])} videos from {spec}"


def generated_clips(args, out_dir: Path) -> tuple[list[Clip], object | None]:
    """(generated clips, the pipeline when they were made here from Shapes prompts, else None)."""
    if args.generated is not None:
        return folder_clips(Path(args.generated), args.size, ""), None
    from eval.generation import generate_frames, shapes_items
    from llm.pipeline import GENERATION_CHECKPOINTS, find_checkpoint, load
    checkpoint = args.checkpoint or find_checkpoint(candidates=GENERATION_CHECKPOINTS)
    args.checkpoint = str(Path(checkpoint).resolve())  # recorded in settings.json
    pipe = load(checkpoint, device=args.device, dtype=args.dtype)
    if pipe.detokenizer is None:
        raise CheckpointError(f"{pipe.checkpoint} names no de-tokenizer in pipeline.json; videos cannot be made")
    items = shapes_items(ShapesWorld(seed=WORLD_SEED), args.num_prompts, 0, args.seed)
    options = {"steps": args.steps, "guidance_scale": args.guidance_scale}
    folder = out_dir / "generated"
    todo = [it for it in items if not (folder / f"{file_stem(it.uid)}.mp4").is_file()]
    for item in tqdm(todo, desc="generating", leave=False):  # written as made: a rerun reuses them
        write_video(folder / f"{file_stem(item.uid)}.mp4", generate_frames(pipe, item.text, item.seed, options))
    return [_file_clip(it.uid, folder / f"{file_stem(it.uid)}.mp4", args.size) for it in items], pipe


def make_descriptor(args, pipe) -> tuple[cd.FrameDescriptor, str | None]:
    """(frame descriptor, the tokenizer directory it came from or None)."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.sscd:
        return cd.SSCDDescriptor(args.sscd, device), None
    if args.tokenizer is None and pipe is not None:
        return cd.DivotViTDescriptor(pipe.tokenizer.vit, pipe.frame_size, pipe.device), str(pipe.checkpoint)
    tok_dir = args.tokenizer
    if tok_dir is None:
        from llm.pipeline import GENERATION_CHECKPOINTS, find_checkpoint, read_pipeline_file
        tok_dir = read_pipeline_file(find_checkpoint(candidates=GENERATION_CHECKPOINTS)).get("tokenizer")
        if tok_dir is None:
            raise CheckpointError("no --sscd and no --tokenizer, and the checkpoint names no Divot tokenizer")
    return cd.DivotViTDescriptor.from_tokenizer_dir(tok_dir, device), str(Path(tok_dir).resolve())


def cached_features(clips: Sequence[Clip], store: FeatureStore, desc: str) -> dict[str, np.ndarray]:
    for clip in tqdm([c for c in clips if not store.has(c.uid)], desc=desc, leave=False):
        store.add(clip.uid, clip.load())
    return store.stack([c.uid for c in clips])


def write_worst(result: dict, gen: Sequence[Clip], train: Sequence[Clip], folder: Path) -> list[dict]:
    """Side-by-side mp4s (generated | nearest training clip) of the most similar pairs."""
    for old in folder.glob("*.mp4"):  # a rerun's ranking replaces the last one's
        old.unlink()
    pairs = []
    for rank, g in enumerate(result["worst"]):
        row = result["rows"][g]
        a, b = gen[g].load(), train[row["nearest"]].load()
        side = max(a.shape[1], b.shape[1])
        path = folder / (f"{rank:02d}_{file_stem(gen[g].uid)}__{file_stem(train[row['nearest']].uid)}"
                         f"_sim{row['similarity']:.3f}.mp4")
        write_video(path, side_by_side(resize_center_crop(a, side), resize_center_crop(b, side)))
        pairs.append({"generated": gen[g].uid, "train": train[row["nearest"]].uid,
                      "similarity": row["similarity"], "video": str(path)})
    return pairs


# ------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--generated", default=None, help="folder of generated videos (else made here with --checkpoint)")
    p.add_argument("--checkpoint", default=None, help="Divot-LLM checkpoint for on-the-fly generation")
    p.add_argument("--num-prompts", type=int, default=64, help="Shapes test prompts to generate from")
    p.add_argument("--seed", type=int, default=0, help="a generated video's seed is this plus its index")
    p.add_argument("--steps", type=int, default=25, help="de-tokenizer sampling steps")
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--train", default="shapes", help="'shapes' (train split), a folder of videos or a .jsonl file")
    p.add_argument("--num-train", type=int, default=None, help="training clips (default: 1000 Shapes / all files)")
    p.add_argument("--sscd", default=None, help="local SSCD TorchScript file (else the Divot ViT, not SSCD)")
    p.add_argument("--tokenizer", default=None, help="Divot tokenizer directory for the divot-vit descriptor")
    p.add_argument("--threshold", type=float, default=None,
                   help=f"copy threshold (default {cd.SSCD_THRESHOLD} SSCD, {cd.VIT_THRESHOLD} divot-vit)")
    p.add_argument("--motion-threshold", type=float, default=cd.MOTION_THRESHOLD)
    p.add_argument("--worst", type=int, default=8, help="most similar pairs written side by side")
    p.add_argument("--size", type=int, default=128, help="videos are read centre-cropped to this side")
    p.add_argument("--output-dir", default="runs/eval/replication", help="results folder (a rerun resumes)")
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--dtype", default=None, help="LLM dtype for generation, e.g. bfloat16")
    args = p.parse_args(argv)
    require_positive(p, args, ("num_prompts", "num_train", "steps", "size"))
    if args.worst < 0:
        p.error(f"--worst must be >= 0, got {args.worst}")
    if args.generated is not None and not Path(args.generated).is_dir():
        p.error(f"--generated '{args.generated}' is not a folder")
    if args.sscd is not None and not Path(args.sscd).is_file():
        p.error(f"--sscd '{args.sscd}' is not a file")
    return args


def settings_of(args, descriptor, source: str | None) -> dict:
    """What decides the cached features (a resumed run must match it)."""
    return {"descriptor": descriptor.name, "sscd": None if args.sscd is None else str(Path(args.sscd).resolve()),
            "tokenizer": source, "size": args.size, "world_seed": WORLD_SEED,
            "train": "shapes" if args.train == "shapes" else str(Path(args.train).resolve()),
            "generated": str(Path(args.generated).resolve()) if args.generated else
            {"checkpoint": args.checkpoint, "seed": args.seed, "steps": args.steps,
             "guidance_scale": args.guidance_scale}}


def main(argv=None) -> dict:
    args = parse_args(argv)
    start, out_dir = time.time(), Path(args.output_dir)
    try:
        gen, pipe = generated_clips(args, out_dir)
        descriptor, source = make_descriptor(args, pipe)
        train, train_described = train_clips(args.train, args.num_train, args.size)
        check_settings(out_dir / "settings.json", settings_of(args, descriptor, source))
        extractors = {"frames": lambda videos: cd.frame_descriptors(videos, descriptor),
                      "tracks": lambda videos: np.stack([cd.motion_tracks(v) for v in videos])}
        gen_feats = cached_features(gen, FeatureStore(out_dir / "features" / "generated", extractors), "generated")
        train_feats = cached_features(train, FeatureStore(out_dir / "features" / "train", extractors), "train")
    except (CheckpointError, FileNotFoundError, ValueError, VideoReadError) as exc:
        sys.exit(f"error: {exc}")
    is_sscd = args.sscd is not None
    threshold = args.threshold if args.threshold is not None else (cd.SSCD_THRESHOLD if is_sscd else cd.VIT_THRESHOLD)
    result = summarize(gen_feats, train_feats, center=not is_sscd, threshold=threshold,
                       motion_threshold=args.motion_threshold, worst=args.worst)
    rows = [{"uid": c.uid, **row, "nearest": train[row["nearest"]].uid,
             "motion_nearest": train[row["motion_nearest"]].uid if row["motion_nearest"] >= 0 else None}
            for c, row in zip(gen, result["rows"])]
    (out_dir / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    worst = write_worst(result, gen, train, out_dir / "worst")
    result = {"descriptor": descriptor.name, **{k: v for k, v in result.items() if k not in ("rows", "worst")},
              "threshold_note": "SSCD copy threshold of replication studies" if is_sscd else
              "calibrated on the planted test set with a random tiny tokenizer; not SSCD, not comparable with papers",
              "motion_note": "motion_*: probe object trajectories (Shapes objects; clips without objects are not "
                             "scored); feature_motion_*: frame-descriptor differences, uncalibrated",
              "train": train_described, "worst_pairs": worst, "seconds": round(time.time() - start, 1)}
    write_json(out_dir / "metrics.json", result)
    print(f"{result['descriptor']}: mean top-1 similarity {result['mean_top_similarity']:.3f}, "
          f"{result['num_replicated']}/{result['num_generated']} at or above {threshold} against "
          f"{result['num_train']} training clips; worst pairs in {out_dir / 'worst'}")
    print(json.dumps({k: result.get(k) for k in HEADLINE}))
    return result


if __name__ == "__main__":
    main()
