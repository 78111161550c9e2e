"""Tiny multi-process training run used by tests/test_runtime.py (launched with accelerate).

    accelerate launch --config_file training/configs/accelerate_cpu_zero2.yaml \
        tests/_ds_toy.py OUTDIR [--steps 8] [--save-every 4] [--resume-step 4] [--tag full] [--accum 2]

Trains a small MLP (with dropout, so the RNG state matters) for ``--steps`` optimizer
steps of ``--accum`` accumulated micro-batches, saving a checkpoint every ``--save-every`` steps.
With ``--resume-step`` it first loads that checkpoint. The main process writes
``OUTDIR/result_<tag>.json``: per-step losses and learning rates, and a checksum of the
full (gathered) weights, so the test can compare an interrupted run with a straight one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from training.checkpoints import CheckpointManager, stepping_optimizer
from training.runtime import (
    log_resolved_config,
    make_accelerator,
    model_input_dtype,
    seed_everything,
    setup_logging,
    unwrap_for_save,
)

MICRO_BATCH = 4
ACCUM = 2
GRAD_CLIP = 1.0


def build_model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 1))


def batch_for(step: int, micro: int, rank: int):
    """Data is a pure function of its position, so a resumed run sees the same batches."""
    g = torch.Generator().manual_seed(100_003 * step + 101 * micro + rank)
    x = torch.randn(MICRO_BATCH, 8, generator=g)
    y = (x * torch.linspace(-1, 1, 8)).sum(dim=1, keepdim=True)
    return x, y


def eval_loss(accelerator, model) -> float:
    """Loss on a fixed batch, dropout off (no RNG use); every rank runs it (ZeRO-3 gathers)."""
    x, y = batch_for(-1, 0, 0)
    model.eval()
    with torch.no_grad():
        x = x.to(accelerator.device, dtype=model_input_dtype(accelerator))
        loss = nn.functional.mse_loss(model(x).float(), y.to(accelerator.device))
    model.train()
    return loss.item()


def lr_lambda(step: int) -> float:
    return min(1.0, (step + 1) / 3) * 0.5 * (1 + math.cos(math.pi * min(step, 20) / 20))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("outdir", type=Path)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--save-every", type=int, default=4)
    p.add_argument("--resume-step", type=int, default=None)
    p.add_argument("--tag", default="full")
    p.add_argument("--accum", type=int, default=ACCUM)
    args = p.parse_args()
    t0 = time.time()

    accelerator = make_accelerator(
        gradient_accumulation_steps=args.accum, micro_batch_size=MICRO_BATCH, grad_clip=GRAD_CLIP
    )
    setup_logging(accelerator)
    assert accelerator.gradient_accumulation_steps == args.accum, accelerator.gradient_accumulation_steps
    seed_everything(0)
    model = build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    log_resolved_config(accelerator, vars(args), args.outdir / f"run_{args.tag}")

    ckpt = CheckpointManager(args.outdir, keep_last=2)
    step = 0
    if args.resume_step is not None:
        state = ckpt.load(accelerator, ckpt.step_dir(args.resume_step))
        step = state["step"]
        assert state["data_position"] == step, state

    losses, lrs, opt_lrs, grad_norms = {}, {}, {}, {}
    eval_start = eval_loss(accelerator, model)
    while step < args.steps:
        for micro in range(args.accum):
            x, y = batch_for(step, micro, accelerator.process_index)
            x, y = x.to(accelerator.device, dtype=model_input_dtype(accelerator)), y.to(accelerator.device)
            with accelerator.accumulate(model):
                loss = nn.functional.mse_loss(model(x).float(), y)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norms[step + 1] = _as_float(accelerator.clip_grad_norm_(model.parameters(), GRAD_CLIP))
                optimizer.step()
                optimizer.zero_grad()
        scheduler.step()  # once per optimizer step (make_accelerator: step_scheduler_with_optimizer=False)
        step += 1
        losses[step] = accelerator.reduce(loss.detach(), reduction="mean").item()
        lrs[step] = scheduler.get_last_lr()[0]
        # the LR the stepping optimizer will really use (differs from lrs if a scheduler is orphaned)
        opt_lrs[step] = stepping_optimizer(optimizer).param_groups[0]["lr"]
        if step % args.save_every == 0:
            ckpt.save(accelerator, step, {"data_position": step, "tag": args.tag})

    eval_end = eval_loss(accelerator, model)
    _, state_dict = unwrap_for_save(accelerator, model)
    if accelerator.is_main_process:
        result = {
            "losses": losses,
            "lrs": lrs,
            "opt_lrs": opt_lrs,
            "eval_start": eval_start,
            "eval_end": eval_end,
            "grad_norms": grad_norms,
            "checksum": float(sum(t.double().sum() for t in state_dict.values())),
            "n_tensors": len(state_dict),
            "world_size": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type),
            "ds_config": _ds_config(accelerator),
            "probe": torch.rand(3).tolist(),  # RNG stream after training: equal iff RNG was restored
            "seconds": time.time() - t0,
        }
        (args.outdir / f"result_{args.tag}.json").write_text(json.dumps(result, indent=2, default=str))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


def _as_float(v):
    return None if v is None else float(v)


def _ds_config(accelerator):
    plugin = accelerator.state.deepspeed_plugin
    return None if plugin is None else plugin.deepspeed_config


if __name__ == "__main__":
    code = main()
    # Everything is written and the process group is shut down. Leave without running the
    # interpreter's teardown: under load a gloo rank has aborted there once ("terminate called
    # without an active exception", C++ destructors racing), failing a run whose work was done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
