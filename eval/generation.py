"""Text-to-video evaluation of a Divot-LLM: prompt following, FVD (or a labelled stand-in), CLIPSIM.

    python eval/generation.py                                   # quick-start checkpoint, Shapes prompts
    python eval/generation.py --checkpoint runs/llm_sft_gen/final --num-prompts 256
    python eval/generation.py --i3d weights/rgb_imagenet.pt     # FVD against rendered Shapes test clips
    python eval/generation.py --captions msrvtt_test.json --clip ViT-B-32.pt \\
        --fvd-real /data/msrvtt/videos --i3d weights/rgb_imagenet.pt   # MSR-VTT: CLIPSIM + FVD

**Prompt following** (the Shapes world): one video per prompt — the canonical captions of the
Shapes test split (index 0 upwards), plus further test clips holding a held-out colour–shape
pair until at least ``--num-heldout`` prompts do — generated with seed ``--seed`` + the clip's
index. The attribute probe (:mod:`divot.probe`) reads the objects back; a video follows its
prompt when colour, shape and direction of every object match one-to-one. Accuracy with its
95% interval is reported overall, on prompts with training pairs only ("seen") and on prompts
with a held-out pair ("heldout"), plus per-attribute agreement.

**FVD** (:mod:`eval.fvd`, :mod:`eval.i3d`): the Fréchet distance between I3D features of the
generated videos and of real ones (``--fvd-real``: ``shapes`` = rendered Shapes test clips, a
folder of videos, or ``none``); needs ``--i3d PATH``. Without it the script says so and
reports ``tokenizer_fd`` — the same distance on the Divot tokenizer's own features — which is
**not FVD**. The generated set is the caption videos when ``--captions`` is given, else the
Shapes prompts' videos.

**CLIPSIM** (:mod:`eval.clipsim`): with ``--clip PATH --captions FILE``, one video per caption
of an MSR-VTT-style file, scored by open_clip.

Outputs in ``--output-dir`` (default ``runs/eval/generation``): ``prompts.jsonl`` and
``captions.jsonl`` (one line per video; a re-run with the same settings resumes),
``features/`` (per-video features for the distances), ``samples/`` (the first
``--save-videos`` videos), ``settings.json``, ``metrics.json``. The last line printed is one
JSON object with the headline metrics.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

# Runnable from a source checkout without installing the package.
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from divot import diffusion  # noqa: E402
from divot.modeling import CheckpointError  # noqa: E402
from divot.probe import attributes_from_caption, probe_agrees_caption, probe_clip  # noqa: E402
from divot.shapes import ShapesWorld, canonical_caption, render  # noqa: E402
from divot.video_io import VIDEO_EXTENSIONS, VideoReadError, read_clip, write_video  # noqa: E402
from eval import clipsim, fvd, i3d  # noqa: E402
from eval.mc_core import accuracy, require_positive, weights_fingerprint  # noqa: E402
from eval.qa_io import ResultLog, check_settings, write_json  # noqa: E402
from llm.pipeline import GENERATION_CHECKPOINTS, PromptTooLongError, find_checkpoint, load  # noqa: E402

WORLD_SEED = 0  # the Shapes world of the tokenizer's reconstruction report
ATTRIBUTES = ("color", "shape", "direction")
I3D_SIZE = i3d.INPUT_SIZE
FEATURE_BATCH = 8
HEADLINE = ("prompt_following", "prompt_following_ci95", "prompt_following_seen", "prompt_following_heldout",
            "num_prompts", "fvd", "tokenizer_fd", "clipsim", "clipsim_raw")


@dataclass(frozen=True)
class Item:
    """One video to generate: ``text`` with ``seed``; ``info`` goes into its result row."""
    uid: str
    text: str
    seed: int
    info: dict = field(default_factory=dict, compare=False)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="Divot-LLM checkpoint (default: llm.pipeline.find_checkpoint())")
    p.add_argument("--num-prompts", type=int, default=64, help="Shapes test-split prompts")
    p.add_argument("--num-heldout", type=int, default=None,
                   help="at least this many prompts with a held-out pair (default: a quarter of --num-prompts)")
    p.add_argument("--steps", type=int, default=25, help="de-tokenizer sampling steps")
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--guidance-rescale", type=float, default=0.7)
    p.add_argument("--sampler", default="ddim", choices=list(diffusion.SAMPLERS))
    p.add_argument("--variance-scale", type=float, default=None, help="GMM sampling variance (default: model's)")
    p.add_argument("--seed", type=int, default=0, help="a video's seed is this plus its index")
    p.add_argument("--output-dir", default="runs/eval/generation", help="results folder (a re-run resumes)")
    p.add_argument("--save-videos", type=int, default=8, help="sample videos to write")
    p.add_argument("--fvd-real", default="shapes", help="real videos for FVD: 'shapes', a folder, or 'none'")
    p.add_argument("--num-real", type=int, default=None, help="real videos (default: as many as generated)")
    p.add_argument("--i3d", default=None, help="local I3D weights (pytorch-i3d state dict) for FVD")
    p.add_argument("--clip", default=None, help="local open_clip weights (file or folder) for CLIPSIM")
    p.add_argument("--clip-arch", default=clipsim.DEFAULT_ARCH, help="open_clip architecture of --clip")
    p.add_argument("--captions", default=None, help="MSR-VTT-style JSON captions file for CLIPSIM")
    p.add_argument("--num-captions", type=int, default=None, help="only the first N captions")
    p.add_argument("--one-per-video", action="store_true", help="only each video's first caption")
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--dtype", default=None, help="LLM dtype, e.g. bfloat16")
    args = p.parse_args(argv)
    require_positive(p, args, ("num_prompts", "steps", "num_real", "num_captions"))
    if args.num_heldout is None:
        args.num_heldout = math.ceil(args.num_prompts / 4)
    if (args.clip is None) != (args.captions is None):
        p.error("CLIPSIM needs both --clip (weights) and --captions (file)")
    if args.fvd_real not in ("shapes", "none") and not Path(args.fvd_real).is_dir():
        p.error(f"--fvd-real '{args.fvd_real}' is neither 'shapes', 'none' nor a folder")
    return args


# ------------------------------------------------------------------ what to generate
def shapes_items(world: ShapesWorld, num_prompts: int, num_heldout: int, seed: int) -> list[Item]:
    """Test clips 0..num_prompts-1, then further held-out test clips up to ``num_heldout``."""
    def item(index: int, clip) -> Item:
        return Item(f"test-{index}", canonical_caption(clip), seed + index,
                    {"split": "test", "index": index, "heldout": clip.heldout})

    items = [item(i, world.clip("test", i)) for i in range(num_prompts)]
    held = sum(it.info["heldout"] for it in items)
    for index in itertools.count(num_prompts):
        if held >= num_heldout:
            break
        clip = world.clip("test", index)
        if clip.heldout:
            items.append(item(index, clip))
            held += 1
    return items


def caption_items(path: str, seed: int, limit: int | None, one_per_video: bool) -> list[Item]:
    captions = clipsim.read_captions(path, one_per_video)[:limit]
    return [Item(c.uid, c.caption, seed + i, {"video": c.video, "caption": c.caption}) for i, c in enumerate(captions)]


def generate_frames(pipe, text: str, seed: int, options: dict) -> np.ndarray:
    """uint8 (f, h, w, 3): the one place where the model makes a video."""
    return pipe.generate_video(text, seed=seed, **options).frames


# ------------------------------------------------------------------ scoring one video
def prompt_row(item: Item, frames: np.ndarray) -> dict:
    """Probe result of one video against its prompt."""
    probed = probe_clip(frames)
    return {"uid": item.uid, "prompt": item.text, "seed": item.seed, **item.info,
            "probed": [{"color": o.color, "shape": o.shape, "direction": o.direction} for o in probed],
            "wanted": attributes_from_caption(item.text), "correct": probe_agrees_caption(probed, item.text),
            "attributes": {a: probe_agrees_caption(probed, item.text, check=(a,)) for a in ATTRIBUTES},
            "count_correct": len(probed) == len(attributes_from_caption(item.text))}


def caption_scorer(scorer: clipsim.ClipScorer) -> Callable[[Item, np.ndarray], dict]:
    def score(item: Item, frames: np.ndarray) -> dict:
        return {"uid": item.uid, "seed": item.seed, **item.info, "clipsim_raw": scorer.score(frames, item.text)}
    return score


def run_items(items: Sequence[Item], generate: Callable[[Item], np.ndarray],
              score: Callable[[Item, np.ndarray], dict], log: ResultLog, store: fvd.FeatureStore,
              samples: Path, save_videos: int, desc: str) -> tuple[list[dict], int]:
    """Rows for ``items`` (in order) and how many came from an earlier run; each new video is
    scored, its features stored, the first ``save_videos`` written, its row appended to ``log``."""
    done = log.load()
    todo = [(i, it) for i, it in enumerate(items) if it.uid not in done or not store.has(it.uid)]
    for position, item in tqdm(todo, desc=desc, leave=False):
        frames = generate(item)
        row = score(item, frames)
        store.add(item.uid, frames)  # before the row: a row always has its features
        if position < save_videos:
            tag = "" if "correct" not in row else ("_ok" if row["correct"] else "_wrong")
            write_video(samples / f"{desc}_{fvd.file_stem(item.uid)}{tag}.mp4", frames)
        log.append([row])
        done[item.uid] = row
    return [done[it.uid] for it in items], len(items) - len(todo)


# ------------------------------------------------------------------ summaries
def prompt_metrics(rows: Sequence[dict]) -> dict:
    """Accuracy overall / seen / held-out with 95% intervals, and per-attribute agreement."""
    out = {}
    for name, subset in (("", rows), ("_seen", [r for r in rows if not r.get("heldout")]),
                         ("_heldout", [r for r in rows if r.get("heldout")])):
        acc = accuracy([bool(r["correct"]) for r in subset])
        out[f"prompt_following{name}"] = acc["accuracy"]
        out[f"prompt_following{name}_ci95"] = acc["accuracy_ci95"]
        out[f"prompt_following{name}_interval"] = acc["accuracy_interval"]
        out[f"num{name or '_prompts'}"] = len(subset)
    out["attribute_accuracy"] = {a: float(np.mean([r["attributes"][a] for r in rows])) if rows else None
                                 for a in ATTRIBUTES}
    out["count_accuracy"] = float(np.mean([r["count_correct"] for r in rows])) if rows else None
    return out


def _chunks(videos: Iterable[np.ndarray], size: int) -> Iterable[list[np.ndarray]]:
    it = iter(videos)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def real_videos(spec: str, count: int, size: int) -> tuple[Iterable[np.ndarray], str]:
    """(uint8 16-frame videos at ``size``, a description) for ``--fvd-real`` (read lazily)."""
    if spec == "shapes":
        world = ShapesWorld(seed=WORLD_SEED, size=size)
        return ((render(world.clip("test", i), size) for i in range(count)),
                f"Shapes test clips 0..{count - 1} rendered at {size}px (world seed {WORLD_SEED})")
    folder = Path(spec)
    if not folder.is_dir():
        raise FileNotFoundError(f"--fvd-real '{spec}' is neither 'shapes', 'none' nor a folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"no videos ({', '.join(VIDEO_EXTENSIONS)}) under {folder}")

    def read():
        used = 0
        for path in files:
            if used >= count:
                return
            try:
                yield read_clip(path, size=size)
                used += 1
            except VideoReadError as exc:
                print(f"skipping {exc}", file=sys.stderr)
    return read(), f"first 2-second clip of up to {count} videos under {folder}, center-cropped to {size}px"


def distances(store: fvd.FeatureStore, uids: Sequence[str], spec: str, num_real: int | None, size: int) -> dict:
    """Fréchet distances per feature kind: ``fvd`` (I3D) and ``tokenizer_fd`` (not FVD)."""
    if not store.extractors:
        return {"fvd": None, "tokenizer_fd": None, "fd_note": "--fvd-real none: no distances computed"}
    generated = store.stack(uids)
    videos, described = real_videos(spec, num_real or len(uids), size)
    real: dict[str, list[np.ndarray]] = {name: [] for name in store.extractors}
    for chunk in tqdm(_chunks(videos, FEATURE_BATCH), desc="real videos", leave=False):
        for name, fn in store.extractors.items():
            real[name].append(fn(chunk))
    real_feats = {name: np.concatenate(parts) if parts else np.zeros((0, 1)) for name, parts in real.items()}
    n_real = len(next(iter(real_feats.values())))
    if min(n_real, len(uids)) < 2:
        note = f"a Fréchet distance needs >= 2 real and >= 2 generated videos; got {n_real} and {len(uids)}"
        print(f"warning: {note}", file=sys.stderr)
        return {"fvd": None, "tokenizer_fd": None, "fd_note": note}
    out = {"fd_real": described, "fd_num_real": n_real, "fd_num_generated": len(uids)}
    out["tokenizer_fd"] = fvd.features_distance(real_feats["tokenizer"], generated["tokenizer"])
    out["tokenizer_fd_note"] = fvd.TOKENIZER_FD_NOTE
    if "i3d" in store.extractors:
        out["fvd"] = fvd.features_distance(real_feats["i3d"], generated["i3d"])
        out["fvd_note"] = "I3D 1024-d pooled features; few videos bias FVD upwards, compare equal set sizes"
    else:
        out["fvd"], out["fvd_note"] = None, fvd.FVD_NEEDS_I3D
    return out


# ------------------------------------------------------------------ main
def load_models(args):
    """(pipeline, I3D or None, ClipScorer or None); exits with a clear message when one fails."""
    if args.checkpoint is None:
        try:
            args.checkpoint = find_checkpoint(candidates=GENERATION_CHECKPOINTS)
        except CheckpointError as exc:
            sys.exit(f"error: {exc}")
        print(f"no --checkpoint: using the quick-start checkpoint {args.checkpoint} (llm.pipeline.find_checkpoint)")
    try:
        pipe = load(args.checkpoint, device=args.device, dtype=args.dtype)
        if pipe.detokenizer is None:
            raise CheckpointError(f"{pipe.checkpoint} names no de-tokenizer in pipeline.json; videos cannot be made")
        i3d_model = i3d.load_i3d(args.i3d, pipe.device) if args.i3d else None
        scorer = clipsim.ClipScorer.from_local(args.clip, args.clip_arch, pipe.device) if args.clip else None
    except (CheckpointError, FileNotFoundError, ImportError) as exc:
        sys.exit(f"error: {exc}")
    return pipe, i3d_model, scorer


def feature_extractors(pipe, i3d_model, spec: str) -> dict:
    if spec == "none":
        return {}
    extractors = {"tokenizer": lambda videos: fvd.tokenizer_features(pipe, videos)}
    if i3d_model is not None:
        extractors["i3d"] = lambda videos: i3d.i3d_features(i3d_model, videos, size=I3D_SIZE)
    return extractors


def settings_of(args, pipe, extractors: dict) -> dict:
    """What decides the stored rows and features (a resumed run must match it)."""
    return {"checkpoint": str(Path(pipe.checkpoint).resolve()),
            "weights": weights_fingerprint(pipe.model, pipe.tokenizer, pipe.detokenizer), "steps": args.steps,
            "guidance_scale": args.guidance_scale, "guidance_rescale": args.guidance_rescale,
            "sampler": args.sampler, "variance_scale": args.variance_scale, "seed": args.seed,
            "dtype": str(pipe.model.dtype), "world_seed": WORLD_SEED, "features": sorted(extractors),
            "i3d": None if args.i3d is None else str(Path(args.i3d).resolve())}


def evaluate_set(name: str, items: Sequence[Item], score, args, pipe, store: fvd.FeatureStore, out_dir: Path,
                 options: dict) -> tuple[list[dict], int]:
    """Generate (or resume) and score the videos of ``items``; rows in ``out_dir/<name>.jsonl``."""
    def generate(item: Item) -> np.ndarray:
        return generate_frames(pipe, item.text, item.seed, options)

    return run_items(items, generate, score, ResultLog(out_dir / f"{name}.jsonl"), store, out_dir / "samples",
                     args.save_videos, name)


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.time()
    pipe, i3d_model, scorer = load_models(args)
    out_dir = Path(args.output_dir)
    extractors = feature_extractors(pipe, i3d_model, args.fvd_real)
    try:
        check_settings(out_dir / "settings.json", settings_of(args, pipe, extractors))
        captions = caption_items(args.captions, args.seed, args.num_captions, args.one_per_video) if scorer else []
        if scorer:
            check_settings(out_dir / "captions_settings.json", {
                "captions": str(Path(args.captions).resolve()), "clip": str(Path(args.clip).resolve()),
                "clip_arch": args.clip_arch})
    except (ValueError, FileNotFoundError) as exc:
        sys.exit(f"error: {exc}")
    if i3d_model is None and extractors:
        print(f"{fvd.FVD_NEEDS_I3D}.\nReporting tokenizer_fd instead — {fvd.TOKENIZER_FD_NOTE}.")
    options = {"steps": args.steps, "guidance_scale": args.guidance_scale, "guidance_rescale": args.guidance_rescale,
               "sampler": args.sampler, "variance_scale": args.variance_scale}
    items = shapes_items(ShapesWorld(seed=WORLD_SEED), args.num_prompts, args.num_heldout, args.seed)
    print(f"generating {len(items)} Shapes prompts ({sum(i.info['heldout'] for i in items)} with held-out pairs) "
          f"with {pipe.checkpoint} → {out_dir}")
    # Features only for the set the distances compare: the caption videos when there are any.
    fd_set = "captions" if scorer else "prompts"
    stores = {name: fvd.FeatureStore(out_dir / "features" / name, extractors if name == fd_set else {})
              for name in ("prompts", "captions")}
    try:
        rows, resumed = evaluate_set("prompts", items, prompt_row, args, pipe, stores["prompts"], out_dir, options)
        result = {"checkpoint": str(pipe.checkpoint), **prompt_metrics(rows), "num_resumed": resumed}
        fd_items = items
        if scorer:
            cap_rows, cap_resumed = evaluate_set("captions", captions, caption_scorer(scorer), args, pipe,
                                                 stores["captions"], out_dir, options)
            result.update(clipsim.summarize([r["clipsim_raw"] for r in cap_rows]), clip_arch=args.clip_arch,
                          num_captions_resumed=cap_resumed)
            fd_items = captions
        size = pipe.detokenizer.config.frame_size
        result.update(distances(stores[fd_set], [i.uid for i in fd_items], args.fvd_real, args.num_real, size))
    except (PromptTooLongError, FileNotFoundError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    result.update(settings=settings_of(args, pipe, extractors), fd_generated=fd_set,
                  seconds=round(time.time() - start, 1))
    write_json(out_dir / "metrics.json", result)
    report(result)
    print(json.dumps({k: result.get(k) for k in HEADLINE} | {"checkpoint": result["checkpoint"]}))
    return result


def report(result: dict) -> None:
    def pct(key):
        value = result.get(key)
        return "n/a" if value is None else f"{value:.3f}"

    print(f"prompt following {pct('prompt_following')} ± {pct('prompt_following_ci95')} over "
          f"{result['num_prompts']} prompts (seen {pct('prompt_following_seen')} over {result['num_seen']}, "
          f"held-out {pct('prompt_following_heldout')} over {result['num_heldout']}; {result['num_resumed']} resumed)")
    if result.get("fvd") is not None:
        print(f"FVD {result['fvd']:.2f} ({result['fd_num_generated']} generated vs {result['fd_num_real']} real)")
    if result.get("tokenizer_fd") is not None:
        print(f"tokenizer_fd {result['tokenizer_fd']:.4f} — {fvd.TOKENIZER_FD_NOTE}")
    if result.get("clipsim") is not None:
        print(f"CLIPSIM {result['clipsim']:.2f} (raw cosine {result['clipsim_raw']:.4f}, {result['clip_arch']}, "
              f"{result['num_videos']} videos)")


if __name__ == "__main__":
    main()
