"""Temporal-only fine-tuning of a de-tokenizer, with the replication report before and after.

    python scripts/temporal_finetune_report.py runs/tokenizer --output-dir runs/eval/temporal_finetune
    python scripts/temporal_finetune_report.py runs/tokenizer --output-dir /tmp/tft --steps 2 --clips 4  # smoke

The mitigation of DESIGN.md §6 ("Frame by Familiar Frame", Rahman et al. 2024): fine-tune only
the de-tokenizer's temporal layers (divot/finetune.py), tokenizer and spatial weights frozen.

1. **before**: RUN_DIR's tokenizer encodes ``--clips`` held-out Shapes test clips; its de-tokenizer
   decodes the tokens (fixed seed, as eval/reconstruction.py); the replication report
   (eval/replication.py, ``replication_report``) compares the decoded clips with ``--num-train``
   Shapes training clips of the run's world (the data it trained on). Descriptor: the run's
   tokenizer ViT (labelled not-SSCD), or ``--sscd FILE``.
2. **fine-tune**: training/pretrain_tokenizer.py as a subprocess, from RUN_DIR's own
   ``config.yaml`` and model configs (``OUT/finetune_config.yaml``) with ``init_from=RUN_DIR detokenizer_trainable=temporal stage1.steps=0
   stage2.steps=--steps`` (stage 2: tokenizer frozen, condition dropout as the run had), into
   ``OUT/finetune`` with ``--resume`` (a rerun with the same arguments continues it).
3. **after**: the same tokens, seeds and training clips through the fine-tuned de-tokenizer.

A reference row scores the held-out input clips themselves (what a perfect reconstruction would
get: Shapes clips share a few colours, shapes and motions, so "similar to some training clip" has
a floor). Also reported: reconstruction PSNR and probe agreement, the parameter counts, and a check
that every non-temporal weight is bit-identical after fine-tuning. Writes ``OUT/report.json``,
``OUT/report.md`` and ``OUT/videos/*.mp4`` (input | before | after); the last line printed is JSON.

Axes: b = clips, f = frames, c = channels, h, w = height, width.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable from a source checkout without installing

from divot import config as cfglib  # noqa: E402
from divot import metrics  # noqa: E402
from divot.autoencoder import VideoAutoencoder  # noqa: E402
from divot.finetune import count_parameters, freeze_all_but_temporal, temporal_parameter_names  # noqa: E402
from divot.modeling import CheckpointError  # noqa: E402
from divot.probe import probe_agrees, probe_clip  # noqa: E402
from divot.shapes import ShapesWorld, render  # noqa: E402
from divot.video_io import side_by_side, to_tensor, to_uint8, write_video  # noqa: E402
from eval import copy_detection as cd  # noqa: E402
from eval.mc_core import require_positive  # noqa: E402
from eval.qa_io import write_json  # noqa: E402
from eval.reconstruction import decode_batches  # noqa: E402
from eval.replication import TRAIN_RENDER, replication_report  # noqa: E402
from training.tokenizer_setup import init_model_overrides  # noqa: E402

TRAINER = REPO / "training" / "pretrain_tokenizer.py"
COLUMNS = (("mean_top_similarity", "mean top-1 sim"), ("max_top_similarity", "max top-1 sim"),
           ("fraction_replicated", "replicated"), ("motion_mean_top_similarity", "motion top-1 sim"),
           ("motion_fraction_replicated", "motion replicated"),
           ("feature_motion_mean_top_similarity", "feature-motion sim"), ("psnr", "PSNR dB"),
           ("probe_agreement", "probe agreement"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="trained tokenizer run (tokenizer/, detokenizer/, config.yaml)")
    p.add_argument("--output-dir", required=True, help="report folder; the fine-tuned run goes to OUT/finetune")
    p.add_argument("--steps", type=int, default=50, help="temporal-only fine-tuning steps")
    p.add_argument("--clips", type=int, default=8, help="held-out Shapes clips decoded before and after")
    p.add_argument("--num-train", type=int, default=256, help="Shapes training clips searched for copies")
    p.add_argument("--lr", type=float, default=None, help="fine-tuning learning rate (default: the run's stage2.lr)")
    p.add_argument("--sample-steps", type=int, default=25, help="de-tokenizer sampling steps")
    p.add_argument("--guidance-scale", type=float, default=None, help="default: the run's config, else 3.0")
    p.add_argument("--seed", type=int, default=0, help="decoding seed (the same before and after)")
    p.add_argument("--sscd", default=None, help="local SSCD TorchScript file (else the run's tokenizer ViT)")
    p.add_argument("--save-videos", type=int, default=4, help="input | before | after videos to write")
    p.add_argument("--train-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra override for the fine-tuning run (repeatable), e.g. batch_size=2")
    args = p.parse_args(argv)
    require_positive(p, args, ("steps", "clips", "num_train", "sample_steps"))
    if args.sscd is not None and not Path(args.sscd).is_file():
        p.error(f"--sscd '{args.sscd}' is not a file")
    return args


def run_settings(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text()) or {}


def finetune_command(args, run_dir: Path, out: Path) -> list[str]:
    """training/pretrain_tokenizer.py arguments for the temporal-only run, whose ``--config`` YAML
    (written beside ``out``) is the run's own settings with its exact model configs."""
    config = cfglib.merge(run_settings(run_dir), init_model_overrides(run_dir))
    config_file = out.with_name(out.name + "_config.yaml")
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    cmd = [sys.executable, str(TRAINER), "--output-dir", str(out), "--resume", "--config", str(config_file)]
    warmup = max(1, min(20, args.steps // 10))
    cmd += [f"init_from={run_dir}", "detokenizer_trainable=temporal", "max_steps=null", "stage1.steps=0",
            f"stage2.steps={args.steps}", f"stage2.warmup_steps={warmup}", f"save_every={args.steps}",
            f"sample_every={args.steps}", f"log_every={max(1, min(10, args.steps))}"]
    if args.lr is not None:
        cmd.append(f"stage2.lr={args.lr}")
    return cmd + list(args.train_arg)


def held_out_clips(seed: int, count: int, size: int):
    """(Shapes test clips, their videos (b, f, c, h, w) in [-1, 1]) — never trained on."""
    world = ShapesWorld(seed=seed)
    clips = [world.clip("test", i) for i in range(count)]
    return clips, torch.stack([to_tensor(render(c, size)) for c in clips])


def decode(model: VideoAutoencoder, videos: torch.Tensor, args) -> torch.Tensor:
    """Tokens of ``videos`` through the de-tokenizer, seeded exactly as eval/reconstruction.py."""
    opts = SimpleNamespace(batch_size=16, steps=args.sample_steps, sampler="ddim", seed=args.seed,
                           guidance_scale=args.guidance_scale, guidance_rescale=0.7)
    torch.manual_seed(args.seed)
    return decode_batches(model, videos, opts, "decoding")


def score(videos: torch.Tensor, inputs: torch.Tensor, clips, train: list[np.ndarray], descriptor) -> dict:
    """The replication report of ``videos`` against ``train``, with PSNR and probe agreement vs ``inputs``."""
    report = replication_report([to_uint8(v) for v in videos], train, descriptor, worst=0)
    agree = [probe_agrees(probe_clip(v), c) for v, c in zip(videos, clips)]
    return {**{k: v for k, v in report.items() if k not in ("rows", "worst")},
            "psnr": metrics.psnr(videos, inputs).mean().item(), "probe_agreement": float(np.mean(agree))}


def weight_check(before: VideoAutoencoder, after: VideoAutoencoder) -> dict:
    """Which tensors moved: every non-temporal one must be bit-identical."""
    temporal = {f"detokenizer.unet.{n}" for n in temporal_parameter_names(before.detokenizer.unet)}
    a, b = dict(before.named_parameters()), dict(after.named_parameters())
    moved = {k for k in a if not torch.equal(a[k], b[k])}
    return {"non_temporal_unchanged": not (moved - temporal), "non_temporal_moved": sorted(moved - temporal)[:10],
            "temporal_tensors": len(temporal), "temporal_tensors_moved": len(moved & temporal)}


def parameter_counts(model: VideoAutoencoder) -> dict:
    """Trainable vs total under the temporal-only option (the flags are put back afterwards)."""
    flags = {n: p.requires_grad for n, p in model.detokenizer.named_parameters()}
    trainable, total = freeze_all_but_temporal(model.detokenizer)
    for n, p in model.detokenizer.named_parameters():
        p.requires_grad_(flags[n])
    tokenizer_total = count_parameters(model.tokenizer)[1]
    return {"detokenizer_trainable": trainable, "detokenizer_total": total, "tokenizer_total_frozen": tokenizer_total,
            "trainable_fraction_of_detokenizer": trainable / total,
            "trainable_fraction_of_all": trainable / (total + tokenizer_total)}


def _cell(value) -> str:
    if value is None:
        return "—"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown(result: dict) -> str:
    rows = [("held-out inputs (reference)", result["reference"]), ("before", result["before"]),
            ("after temporal-only fine-tuning", result["after"])]
    lines = ["| clips | " + " | ".join(title for _, title in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    lines += [f"| {name} | " + " | ".join(_cell(r.get(k)) for k, _ in COLUMNS) + " |" for name, r in rows]
    p, w = result["parameters"], result["weights"]
    lines += ["", f"Trainable: {p['detokenizer_trainable']:,} of {p['detokenizer_total']:,} de-tokenizer parameters "
              f"({100 * p['trainable_fraction_of_detokenizer']:.1f}%); tokenizer ({p['tokenizer_total_frozen']:,}) "
              f"frozen. Non-temporal weights unchanged: {w['non_temporal_unchanged']}; temporal tensors moved: "
              f"{w['temporal_tensors_moved']} of {w['temporal_tensors']}.",
              f"Descriptor: {result['before']['descriptor']} (threshold {result['before']['threshold']}); "
              f"{result['clips']} held-out clips vs {result['num_train']} training clips; "
              f"{result['finetune_steps']} fine-tuning steps; {result['sample_steps']} sampling steps, "
              f"guidance {result['guidance_scale']}, seed {result['seed']}."]
    return "\n".join(lines) + "\n"


def load_run(path: Path) -> VideoAutoencoder:
    try:
        return VideoAutoencoder.from_pretrained(path)
    except (CheckpointError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    start, run_dir, out = time.time(), Path(args.run_dir), Path(args.output_dir)
    settings = run_settings(run_dir)
    if args.guidance_scale is None:
        args.guidance_scale = float(settings.get("guidance_scale", 3.0))
    before = load_run(run_dir)
    seed = int(settings.get("seed", 0))  # the world the run trained on
    clips, inputs = held_out_clips(seed, args.clips, before.frame_size)
    world = ShapesWorld(seed=seed)
    train = [render(world.clip("train", i), TRAIN_RENDER) for i in range(args.num_train)]
    # The tokenizer is frozen by the fine-tuning, so one descriptor serves before and after.
    descriptor = cd.SSCDDescriptor(args.sscd) if args.sscd else cd.DivotViTDescriptor.from_tokenizer_dir(
        run_dir / "tokenizer")
    reference = {**score(inputs, inputs, clips, train, descriptor), "psnr": None}  # inputs vs themselves
    recon_before = decode(before, inputs, args)
    result = {"run": str(run_dir), "clips": args.clips, "num_train": args.num_train, "finetune_steps": args.steps,
              "sample_steps": args.sample_steps, "guidance_scale": args.guidance_scale, "seed": args.seed,
              "reference": reference, "before": score(recon_before, inputs, clips, train, descriptor)}
    cmd = finetune_command(args, run_dir, out / "finetune")
    print("fine-tuning:", " ".join(cmd), flush=True)
    if subprocess.run(cmd, cwd=REPO).returncode != 0:
        sys.exit("error: the fine-tuning run failed (see its output above)")
    after = load_run(out / "finetune")
    recon_after = decode(after, inputs, args)
    result.update(after=score(recon_after, inputs, clips, train, descriptor), command=cmd,
                  parameters=parameter_counts(before), weights=weight_check(before, after))
    for i in range(min(args.save_videos, args.clips)):
        write_video(out / "videos" / f"clip_{i:03d}.mp4", side_by_side(inputs[i], recon_before[i], recon_after[i]))
    result["seconds"] = round(time.time() - start, 1)
    write_json(out / "report.json", result)
    (out / "report.md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))
    print(json.dumps({k: result[k] for k in ("clips", "num_train", "finetune_steps")} | {
        f"{row}_{k}": result[row].get(k) for row in ("before", "after") for k, _ in COLUMNS[:3]}))
    return result


if __name__ == "__main__":
    main()
