"""Train the Divot tokenizer and its diffusion de-tokenizer (DESIGN.md §2–3).

    accelerate launch training/pretrain_tokenizer.py                 # tiny preset, Shapes world, CPU
    accelerate launch training/pretrain_tokenizer.py --config my.yaml stage1.lr=3e-4
    accelerate launch --config_file training/configs/accelerate_8gpu_zero2.yaml \\
        training/pretrain_tokenizer.py preset=paper data.source=folder data.jsonl=webvid.jsonl \\
        tokenizer.vit.checkpoint=/weights/open_clip_vit_h14.bin detokenizer.vae_path=/weights/sd-vae
    ... --resume                                                     # continue after an interruption
    accelerate launch training/pretrain_tokenizer.py --output-dir runs/tokenizer_temporal \\
        init_from=runs/tokenizer detokenizer_trainable=temporal stage1.steps=0 stage2.steps=200
                                    # temporal-only fine-tuning from a trained run (DESIGN.md §6)

Stage 1 trains tokenizer + U-Net end to end; stage 2 freezes the tokenizer and
fine-tunes the U-Net with 5% condition dropout. The run directory holds
``config.yaml``, TensorBoard logs (``tb/``), reconstruction previews
(``samples/step_*.mp4``: input | reconstruction), checkpoints
(``checkpoints/step_*``) and, at the end, ``tokenizer/`` and ``detokenizer/``
(``config.json`` + ``model.safetensors``) for ``eval/reconstruction.py``.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from divot import config as cfglib
from divot import metrics
from divot.data import VideoTextDataset, collate_videos
from divot.modeling import CheckpointError
from divot.shapes import ShapesVideoDataset
from divot.video_io import side_by_side, to_uint8, write_video
from training import cli, optim, runtime
from training.checkpoints import CheckpointManager
from training.ema import TokenizerEMA, check_decay
from training.tokenizer_setup import (StepSampler, TokenizerAutoencoder, TokenizerTrainConfig, build_model,
                                      check_init_from, check_resumable, expand_presets, optimizer_groups, stage_of)

logger = logging.getLogger("pretrain_tokenizer")


def build_loader(cfg: TokenizerTrainConfig, rank: int, world: int, start_step: int):
    size = cfg.detokenizer.frame_size
    if cfg.data.source == "shapes":
        # The Shapes world is procedural: index i is a fresh clip, so no epochs or shuffling.
        ds, shuffle = ShapesVideoDataset("train", size=size, length=10**12, seed=cfg.seed), False
    elif cfg.data.source == "folder":
        if not cfg.data.jsonl:
            raise ValueError("data.source=folder needs data.jsonl=PATH (lines of {\"video\", \"caption\"})")
        ds = VideoTextDataset(cfg.data.jsonl, cfg.data.video_root, size=size,
                              num_frames=cfg.detokenizer.num_frames, random_start=cfg.data.random_start,
                              seed=cfg.seed)
        shuffle = True
    else:
        raise ValueError(f"data.source must be 'shapes' or 'folder', got {cfg.data.source!r}")
    sampler = StepSampler(len(ds), cfg.batch_size, rank, world, cfg.seed, start_step, shuffle)
    # The loader's own generator: creating an iterator draws a base seed, which must not come
    # from the global RNG (a resumed run creates its iterator right after restoring that RNG).
    return torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, sampler=sampler,
                                       num_workers=cfg.data.num_workers, collate_fn=collate_videos,
                                       persistent_workers=cfg.data.num_workers > 0,
                                       generator=torch.Generator().manual_seed(cfg.seed))


def preview_clips(cfg: TokenizerTrainConfig) -> torch.Tensor:
    """A fixed batch of held-out clips for the periodic reconstruction previews."""
    ds = ShapesVideoDataset("val", size=cfg.detokenizer.frame_size, seed=cfg.seed)
    return torch.stack([ds[i]["video"] for i in range(cfg.sample_clips)])


@torch.no_grad()
def write_preview(model: TokenizerAutoencoder, clips: torch.Tensor, cfg: TokenizerTrainConfig, step: int,
                  stage: int, accelerator) -> float:
    """Encode → decode the preview clips; every rank runs it (ZeRO-3 needs all ranks in a forward)."""
    was_training = model.training
    model.eval()
    if stage == 1:
        model.refresh_null_tokens()  # the tokenizer is still moving in stage 1
    clips = clips.to(accelerator.device)
    tokens = model.tokenizer(clips)
    g = torch.Generator(device=clips.device).manual_seed(cfg.seed)
    recon = model.detokenizer.decode(tokens, steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale,
                                     guidance_rescale=cfg.guidance_rescale, sampler=cfg.sampler, generator=g)
    psnr = metrics.psnr(recon, clips).mean().item()
    if accelerator.is_main_process:
        rows = [side_by_side(to_uint8(a.cpu()), to_uint8(b.cpu())) for a, b in zip(clips, recon)]
        out = Path(cfg.output_dir) / "samples" / f"step_{step:08d}.mp4"
        write_video(out, np.concatenate(rows, axis=1), fps=8.0)  # clips stacked vertically
        logger.info("preview %s (PSNR %.2f dB)", out, psnr)
    model.train(was_training)
    return psnr


def export(model, accelerator, cfg: TokenizerTrainConfig, ema: TokenizerEMA | None = None) -> None:
    """Final ``tokenizer/`` and ``detokenizer/`` directories (complete weights, also under ZeRO-3);
    with ``ema``, its averaged weights (and the grey-clip tokens of the averaged tokenizer)."""
    if ema is not None:
        ema.copy_to_model()
        accelerator.unwrap_model(model).refresh_null_tokens()
    module, state = runtime.unwrap_for_save(accelerator, model)
    if accelerator.is_main_process:
        out = Path(cfg.output_dir)
        for name in ("tokenizer", "detokenizer"):
            part = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
            getattr(module, name).save_pretrained(out / name, state_dict=part)
        print(f"saved tokenizer and de-tokenizer to {out}/{{tokenizer,detokenizer}}")


def make_ema(cfg: TokenizerTrainConfig, accelerator, model) -> TokenizerEMA | None:
    """The weights' moving average (``ema_decay`` > 0), registered so checkpoints hold it."""
    if not cfg.ema_decay:
        return None
    ema = TokenizerEMA(accelerator.unwrap_model(model), cfg.ema_decay)
    accelerator.register_for_checkpointing(ema)
    return ema


def train(cfg: TokenizerTrainConfig, resume: bool) -> None:
    out = Path(cfg.output_dir)
    accelerator = runtime.start_run(cfg, out)
    model = build_model(cfg)  # fresh, or init_from's weights; frozen per detokenizer_trainable
    if cfg.gradient_checkpointing:
        model.detokenizer.unet.enable_gradient_checkpointing()
    logger.info("tokenizer %.2fM trainable params, de-tokenizer %.2fM", model.tokenizer.num_parameters(True) / 1e6,
                model.detokenizer.num_parameters(True) / 1e6)
    groups, lambdas = optimizer_groups(model, cfg)  # trainable parameters only
    optimizer = optim.adamw(groups, lr=cfg.stage1.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                            impl=cfg.optimizer_impl)
    optim.compile_modules(model.tokenizer, model.detokenizer.unet, enabled=cfg.compile)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ema = make_ema(cfg, accelerator, model)
    ckpt = CheckpointManager(out, keep_last=cfg.keep_last)
    state, step = ckpt.resume(accelerator, resume, check=check_resumable)
    counters = dict(state.get("counters", {})) if state else {"corrupt": 0, "skipped_batches": 0}
    accelerator.init_trackers("pretrain_tokenizer", config=runtime.flat_dict(cfglib.to_dict(cfg)))
    loop(cfg, accelerator, model, optimizer, scheduler, ckpt, step, counters, ema)
    export(model, accelerator, cfg, ema)
    accelerator.end_training()


def next_video(loader, counters: dict, cache: dict):
    """The next batch's clips; an all-corrupt batch reuses the previous one so ranks stay in step."""
    while True:
        batch = next(loader)
        counters["corrupt"] += batch["num_corrupt"]
        if batch["video"] is not None:
            cache["video"] = batch["video"]
            return batch["video"]
        counters["skipped_batches"] = counters.get("skipped_batches", 0) + 1
        if cache.get("video") is not None:
            return cache["video"]


def optimizer_step(cfg, accelerator, model, optimizer, scheduler, loader, counters, cache, stage, scfg):
    """One optimizer step over ``gradient_accumulation_steps`` micro-batches."""
    dtype = runtime.model_input_dtype(accelerator)
    losses, spreads, grad_norm = [], [], None
    for _ in range(accelerator.gradient_accumulation_steps):
        video = next_video(loader, counters, cache).to(accelerator.device, dtype)
        with accelerator.accumulate(model):
            loss, spread = model(video, train_tokenizer=stage == 1, cond_dropout=scfg.cond_dropout,
                                 per_frame_prob=cfg.per_frame_prob, timestep_shift=scfg.timestep_shift,
                                 known_frames_prob=cfg.known_frames_prob, task_mix=cfg.known_frames_tasks)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().float())
        spreads.append(spread)
    scheduler.step()  # once per optimizer step (the accelerator does not step it)
    return torch.stack(losses).mean(), torch.stack(spreads).mean(), grad_norm


def loop(cfg, accelerator, model, optimizer, scheduler, ckpt, step, counters, ema=None) -> None:
    raw = accelerator.unwrap_model(model)
    gas = accelerator.gradient_accumulation_steps
    loader = iter(build_loader(cfg, accelerator.process_index, accelerator.num_processes, step * gas))
    previews, total, cache, t0 = preview_clips(cfg), cfg.total_steps, {}, time.time()
    bar = tqdm(total=total, initial=step, desc="tokenizer", disable=not accelerator.is_main_process,
               dynamic_ncols=True)
    if step >= cfg.stage1.steps:
        raw.refresh_null_tokens()
    model.train()
    while step < total:
        stage, scfg = stage_of(cfg, step)
        if step == cfg.stage1.steps:
            if ema is not None:
                ema.reset_tokenizer()
            raw.refresh_null_tokens()  # tokenizer frozen from here on: its grey-clip tokens are final
            logger.info("stage 2: tokenizer frozen, U-Net fine-tuning with %.0f%% condition dropout",
                        100 * scfg.cond_dropout)
        loss, spread, grad_norm = optimizer_step(cfg, accelerator, model, optimizer, scheduler, loader, counters,
                                         cache, stage, scfg)
        step += 1
        if ema is not None:
            ema.step()
        bar.update(1)
        if step % cfg.log_every == 0 or step == total:
            lrs = scheduler.get_last_lr()
            clips = cfg.batch_size * gas * accelerator.num_processes * cfg.log_every
            logs = {"loss": accelerator.reduce(loss, "mean").item(), "stage": stage,
                    "lr/tokenizer": lrs[0] if len(lrs) > 1 else 0.0, "lr/detokenizer": lrs[-1],  # frozen: no group
                    "grad_norm": float(grad_norm) if grad_norm is not None else 0.0,
                    "data/corrupt_total": counters["corrupt"], "clips_per_s": clips / max(time.time() - t0, 1e-6),
                    "tokens/spread_across_clips": accelerator.reduce(spread, "mean").item()}
            t0 = time.time()
            accelerator.log(logs, step=step)
            bar.set_postfix(loss=f"{logs['loss']:.4f}", spread=f"{logs['tokens/spread_across_clips']:.3f}",
                            stage=stage)
        if step % cfg.sample_every == 0 or step == total:
            with ema.averaged() if ema is not None else contextlib.nullcontext():
                psnr = write_preview(raw, previews, cfg, step, stage, accelerator)
            accelerator.log({"preview/psnr": psnr}, step=step)
        if step % cfg.save_every == 0 or step == total:
            ckpt.save(accelerator, step, {"counters": counters, "stage": stage})
    bar.close()
    if counters["corrupt"]:
        logger.warning("skipped %d unreadable videos during training", counters["corrupt"])
    if cfg.stage2.steps == 0 or step <= cfg.stage1.steps:
        raw.refresh_null_tokens()  # stage 2 never ran: match the final tokenizer


def main(argv=None) -> None:
    parser = cli.build_parser(__doc__.splitlines()[0], "runs/tokenizer")
    args, overrides = cli.parse(parser, argv)
    try:
        cfg = cli.resolve(TokenizerTrainConfig, args, overrides, expand=expand_presets)
        check_init_from(cfg)
        check_decay(cfg.ema_decay)
    except (cfglib.ConfigError, ValueError, CheckpointError) as e:
        sys.exit(f"config error: {e}")
    if args.print_config:
        print(yaml.safe_dump(cfglib.to_dict(cfg), sort_keys=False))
        return
    try:
        train(cfg, resume=args.resume)
    except CheckpointError as e:  # e.g. --resume on a checkpoint of an older layout: the reason, no traceback
        sys.exit(f"checkpoint error: {e}")


if __name__ == "__main__":
    main()
