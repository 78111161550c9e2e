"""Reconstruction report: clip → Divot tokens → de-tokenizer → clip, scored three ways.

    python eval/reconstruction.py                                   # runs/tokenizer, Shapes test clips
    python eval/reconstruction.py --checkpoint DIR --num-clips 128 --steps 25
    python eval/reconstruction.py --checkpoint DIR --data my_videos/   # + PSNR/SSIM on real videos

For held-out Shapes clips (the test split, never trained on) it reports PSNR,
SSIM and **probe agreement**: the attribute probe reads colour, shape and
direction back from the reconstruction and all three must match the clip. The
figures are given overall, for clips with only training colour–shape pairs
("seen") and for clips with a held-out pair ("heldout"). Diagnostics beside them:
how each true shape was read (``probe_shape_confusion``), the reconstruction's
grey level where the clip is black (``background_level``, 0–255) and SSIM with
that background set to black (``ssim_background_fixed``). For a folder of real
videos (``--data``) it reports PSNR/SSIM. The last line printed is one JSON
object; ``metrics.json`` and side-by-side videos (input | reconstruction) go to
``--output-dir``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from divot import diffusion, metrics
from divot.autoencoder import VideoAutoencoder
from divot.modeling import CheckpointError
from divot.probe import agreement_rates, probe_agrees, probe_clip, shape_confusion
from divot.shapes import ShapesWorld, render
from divot.video_io import VIDEO_EXTENSIONS, VideoReadError, read_clip, side_by_side, to_tensor, to_uint8, write_video


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="runs/tokenizer", help="run dir with tokenizer/ and detokenizer/")
    p.add_argument("--data", default=None, help="folder of real videos (PSNR/SSIM only)")
    p.add_argument("--num-clips", type=int, default=64, help="held-out Shapes clips to score")
    p.add_argument("--steps", type=int, default=25, help="sampling steps")
    p.add_argument("--sampler", default="ddim", choices=list(diffusion.SAMPLERS))
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance (default: the run's config.yaml, else 7.5)")
    p.add_argument("--guidance-rescale", type=float, default=0.7)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-videos", type=int, default=8, help="side-by-side videos to write")
    p.add_argument("--output-dir", default=None, help="default: CHECKPOINT/reconstruction")
    return p.parse_args(argv)


def load_run(checkpoint: Path, guidance_scale: float | None = None) -> tuple[VideoAutoencoder, float]:
    """A tokenizer run's tokenizer + de-tokenizer, and the guidance scale to decode with (the
    run's own unless given). Exits with a hint when there is no trained run there."""
    try:
        model = VideoAutoencoder.from_pretrained(checkpoint)
    except (CheckpointError, FileNotFoundError) as e:
        sys.exit(f"error: {e}\nTrain one first: accelerate launch training/pretrain_tokenizer.py")
    if guidance_scale is None:
        guidance_scale = float(run_config(checkpoint).get("guidance_scale", 7.5))
    return model, guidance_scale


def run_config(checkpoint: Path) -> dict:
    path = checkpoint / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def decode_batches(model: VideoAutoencoder, videos: torch.Tensor, args, desc: str) -> torch.Tensor:
    out = []
    g = torch.Generator().manual_seed(args.seed)
    for i in tqdm(range(0, len(videos), args.batch_size), desc=desc, leave=False):
        batch = videos[i:i + args.batch_size]
        out.append(model.reconstruct(batch, steps=args.steps, sampler=args.sampler, generator=g,
                                     guidance_scale=args.guidance_scale, guidance_rescale=args.guidance_rescale))
    return torch.cat(out)


def shapes_report(model: VideoAutoencoder, args, out_dir: Path) -> dict:
    world = ShapesWorld(seed=0, size=model.frame_size)
    clips = [world.clip("test", i) for i in range(args.num_clips)]
    videos = torch.stack([to_tensor(render(c, model.frame_size)) for c in clips])
    recon = decode_batches(model, videos, args, "shapes")
    psnr, ssim = metrics.psnr(recon, videos), metrics.ssim(recon, videos)
    probed = [probe_clip(r) for r in recon]
    agree = np.array([probe_agrees(p, c) for p, c in zip(probed, clips)])
    per_attr = {a: rate for a, rate in agreement_rates(probed, clips).items() if a != "all"}
    heldout = np.array([c.heldout for c in clips])
    for i in range(min(args.save_videos, len(clips))):
        tag = "ok" if agree[i] else "wrong"
        write_video(out_dir / f"shapes_{i:03d}_{tag}.mp4", side_by_side(to_uint8(videos[i]), to_uint8(recon[i])))
    return {
        "psnr": psnr.mean().item(), "ssim": ssim.mean().item(), "probe_agreement": float(agree.mean()),
        "probe_agreement_ci95": metrics.mean_ci95(agree.astype(float))[1],
        "probe_agreement_seen": float(agree[~heldout].mean()) if (~heldout).any() else None,
        "probe_agreement_heldout": float(agree[heldout].mean()) if heldout.any() else None,
        "probe_attribute_accuracy": per_attr, "num_clips": len(clips), "num_heldout": int(heldout.sum()),
        # Diagnostics: how shapes are misread, and how much of SSIM is the background's level.
        "probe_shape_confusion": shape_confusion(probed, clips),
        "background_level": metrics.background_level(recon, videos),
        "ssim_background_fixed": metrics.ssim_background_fixed(recon, videos).mean().item(),
        "probe_on_inputs": float(np.mean([probe_agrees(probe_clip(v), c) for v, c in zip(videos, clips)])),
    }


def real_report(model: VideoAutoencoder, args, out_dir: Path) -> dict:
    files = sorted(p for p in Path(args.data).rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"no videos ({', '.join(VIDEO_EXTENSIONS)}) under {args.data}")
    videos, unreadable = [], []
    for f in files:
        try:
            videos.append(to_tensor(read_clip(f, size=model.frame_size)))
        except VideoReadError as e:
            print(f"skipping {e}", file=sys.stderr)
            unreadable.append(str(f))
    if not videos:
        raise VideoReadError(args.data, "none of the videos could be read")
    videos = torch.stack(videos)
    recon = decode_batches(model, videos, args, "real")
    for i in range(min(args.save_videos, len(videos))):
        write_video(out_dir / f"real_{i:03d}.mp4", side_by_side(to_uint8(videos[i]), to_uint8(recon[i])))
    return {"psnr": metrics.psnr(recon, videos).mean().item(), "ssim": metrics.ssim(recon, videos).mean().item(),
            "num_videos": len(videos), "unreadable": unreadable}


def main(argv=None) -> dict:
    args = parse_args(argv)
    ckpt = Path(args.checkpoint)
    model, args.guidance_scale = load_run(ckpt, args.guidance_scale)
    out_dir = Path(args.output_dir or ckpt / "reconstruction")
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    t0 = time.time()
    result = {"checkpoint": str(ckpt), "steps": args.steps, "sampler": args.sampler,
              "guidance_scale": args.guidance_scale, "guidance_rescale": args.guidance_rescale,
              **shapes_report(model, args, out_dir)}
    print(f"Shapes test clips: PSNR {result['psnr']:.2f} dB  SSIM {result['ssim']:.3f}  "
          f"probe agreement {result['probe_agreement']:.3f} (seen {result['probe_agreement_seen']}, "
          f"heldout {result['probe_agreement_heldout']})")
    print(f"background grey level {result['background_level']:.1f} / 255, SSIM with it set to black "
          f"{result['ssim_background_fixed']:.3f}; shapes read as: "
          + "; ".join(f"{s} → " + ", ".join(f"{r} {n}" for r, n in row.items() if n)
                      for s, row in result["probe_shape_confusion"].items()))
    if args.data:
        result["real"] = real_report(model, args, out_dir)
        print(f"real videos: PSNR {result['real']['psnr']:.2f} dB  SSIM {result['real']['ssim']:.3f}")
    result["seconds"] = round(time.time() - t0, 1)
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
