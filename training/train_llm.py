"""Train Divot-LLM: pretraining, then comprehension SFT and generation SFT (DESIGN.md §4).

    accelerate launch training/train_llm.py --stage pretrain          # tiny preset, Shapes world, CPU
    accelerate launch training/train_llm.py --stage sft-comp          # from runs/llm_pretrain/merged
    accelerate launch training/train_llm.py --stage sft-gen
    accelerate launch --config_file training/configs/accelerate_8gpu_zero2.yaml training/train_llm.py \\
        --stage pretrain --config training/configs/llm_paper.yaml     # Mistral-7B, paper recipe
    ... --resume                                                       # continue after an interruption

The frozen Divot tokenizer (``tokenizer_dir``, default ``runs/tokenizer/tokenizer`` as written
by ``training/pretrain_tokenizer.py``) turns every clip into 64 tokens, read from
``feature_cache`` (``scripts/cache_features.py``) where present. The run directory holds
``config.yaml``, TensorBoard logs (``tb/``), ``metrics.jsonl`` (the logged scalars),
checkpoints (``checkpoints/step_*``) and, at the end, ``final/`` (``DivotLLM.save_pretrained``
training layout) and, after pretraining, ``merged/`` (LoRA merged, the SFT stages' start).
Both carry ``pipeline.json`` naming the tokenizer and de-tokenizer that go with the LLM.

Tiny preset on a CPU: its matrices are small, so on a 2-core machine that is busy with other
work ``DIVOT_NUM_THREADS=1`` is several times faster than the default of all cores.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from divot import config as cfglib
from divot.modeling import CheckpointError
from llm.model import STAGES, DivotLLM
from llm.text_tokenizer import IGNORE_INDEX
from training import cli, optim, runtime
from training.checkpoints import CheckpointManager
from training.llm_setup import (PIPELINE_FILE, LLMTrainConfig, build_collator, build_features,
                                build_loader, build_model, check_inputs, expand_presets, lr_multiplier,
                                param_groups, pipeline_info)

logger = logging.getLogger("train_llm")

BATCH_KEYS = ("input_ids", "attention_mask", "labels", "clip_mask", "clip_tokens", "query_mask", "target_tokens")


def next_batch(loader, counters: dict) -> dict:
    """The next micro-batch with at least one readable sample; empty ones are skipped and counted
    (the count moves this rank's data position, see ``resume_counters``)."""
    while True:
        batch = next(loader)
        counters["corrupt"] += batch["num_corrupt"]
        if batch["input_ids"].shape[0] > 0:
            return batch
        counters["skipped"] += 1


def optimizer_step(cfg: LLMTrainConfig, accelerator, model, optimizer, scheduler, loader, counters: dict):
    """One optimizer step over ``gradient_accumulation_steps`` micro-batches.

    Returns loss sums ``[loss, ce, gmm]`` and counts ``[micro-batches, with text, with video
    targets]``: a batch without supervised text has CE 0, one without targets GMM 0, and
    neither should pull the logged means down. Also the gradient norm.
    """
    sums, counts, grad_norm = torch.zeros(3), torch.zeros(3), None
    for _ in range(accelerator.gradient_accumulation_steps):
        batch = next_batch(loader, counters)
        inputs = {k: batch[k].to(accelerator.device) for k in BATCH_KEYS}
        with accelerator.accumulate(model):
            out = model(**inputs, return_logits=False)
            accelerator.backward(out.loss)
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        present = torch.tensor([1.0, float((batch["labels"] != IGNORE_INDEX).any()),
                                float(batch["target_tokens"].shape[0] > 0)])
        terms = torch.stack([out.loss.detach(), out.ce_loss.detach(), out.gmm_loss.detach()]).float().cpu()
        sums += terms * present
        counts += present
    scheduler.step()  # once per optimizer step (the accelerator does not step it)
    return sums, counts, grad_norm


def gather_counters(accelerator, counters: dict) -> dict[str, list[int]]:
    """Every rank's counters (collective), for the checkpoint and the totals."""
    local = torch.tensor([[counters["corrupt"], counters["skipped"]]], device=accelerator.device)
    rows = accelerator.gather(local).reshape(-1, 2).tolist()
    return {"corrupt_by_rank": [int(r[0]) for r in rows], "skipped_by_rank": [int(r[1]) for r in rows]}


def resume_counters(state: dict | None, accelerator) -> dict:
    """This rank's counters from a checkpoint; skipped empty batches shift its data position."""
    counters = {"corrupt": 0, "skipped": 0}
    saved = (state or {}).get("counters") or {}
    corrupt, skipped = saved.get("corrupt_by_rank", []), saved.get("skipped_by_rank", [])
    if len(skipped) == accelerator.num_processes:
        counters = {"corrupt": corrupt[accelerator.process_index], "skipped": skipped[accelerator.process_index]}
    elif any(skipped):
        logger.warning("checkpoint written by %d processes, resuming with %d: positions of skipped empty "
                       "batches are lost, data order differs slightly", len(skipped), accelerator.num_processes)
    return counters


def log_metrics(cfg, accelerator, step: int, window: torch.Tensor, grad_norm, scheduler, counters, t0) -> dict:
    """Means over the log window and all ranks; TensorBoard + ``metrics.jsonl``. Collective."""
    total = accelerator.reduce(window.to(accelerator.device), "sum").cpu()
    means = (total[:3] / total[3:].clamp(min=1)).tolist()
    corrupt = sum(gather_counters(accelerator, counters)["corrupt_by_rank"])
    samples = float(total[3]) * cfg.batch_size  # micro-batches of all ranks (less dropped samples)
    # A term no batch of the window had (e.g. no video targets) is left out, not logged as 0.
    logs = {name: m for name, m, n in zip(("loss", "loss/ce", "loss/gmm"), means, total[3:]) if n > 0}
    logs.update({"lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm) if grad_norm is not None else 0.0,
                 "data/corrupt_total": corrupt, "samples_per_s": samples / max(time.time() - t0, 1e-6)})
    accelerator.log(logs, step=step)
    if accelerator.is_main_process:
        with open(Path(cfg.output_dir) / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **logs}) + "\n")
    return logs


def loop(cfg: LLMTrainConfig, accelerator, model, optimizer, scheduler, ckpt, step: int, counters: dict,
         collator) -> dict:
    gas, total = accelerator.gradient_accumulation_steps, cfg.total_steps
    loader = iter(build_loader(cfg, collator, accelerator.process_index, accelerator.num_processes,
                               step * gas + counters["skipped"]))
    bar = tqdm(total=total, initial=step, desc=f"llm {cfg.stage}", disable=not accelerator.is_main_process,
               dynamic_ncols=True)
    logs, t0, window = {}, time.time(), torch.zeros(6)
    model.train()
    while step < total:
        sums, counts, grad_norm = optimizer_step(cfg, accelerator, model, optimizer, scheduler, loader, counters)
        window += torch.cat([sums, counts])
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == total:
            logs.update(log_metrics(cfg, accelerator, step, window, grad_norm, scheduler, counters, t0))
            t0, window = time.time(), torch.zeros(6)
            bar.set_postfix({k.split("/")[-1]: f"{logs[k]:.3g}" for k in ("loss", "loss/ce", "loss/gmm", "lr")
                             if k in logs})
        if step % cfg.save_every == 0 or step == total:
            ckpt.save(accelerator, step, {"counters": gather_counters(accelerator, counters), "stage": cfg.stage})
    bar.close()
    if counters["corrupt"] or counters["skipped"]:
        logger.warning("dropped %d unreadable samples, skipped %d all-unreadable batches (this rank)",
                       counters["corrupt"], counters["skipped"])
    return logs


def write_pipeline(directory: Path, cfg: LLMTrainConfig) -> None:
    cfglib.save_json(pipeline_info(cfg.tokenizer_dir), directory, name=PIPELINE_FILE)  # write-then-rename


def export(model, accelerator, cfg: LLMTrainConfig) -> list[Path]:
    """``final/`` (complete weights, also under ZeRO-3) and, after pretraining, ``merged/``."""
    module, state = runtime.unwrap_for_save(accelerator, model)
    out = Path(cfg.output_dir)
    written = [out / "final"] + ([out / "merged"] if cfg.stage == "pretrain" else [])
    if accelerator.is_main_process:
        module.save_pretrained(out / "final", state_dict=state)
        write_pipeline(out / "final", cfg)
        if cfg.stage == "pretrain":
            # Merge a copy read back from final/: the trained module may be sharded or wrapped.
            DivotLLM.from_pretrained(out / "final").save_merged(out / "merged")
            write_pipeline(out / "merged", cfg)
    accelerator.wait_for_everyone()
    return written


def train(cfg: LLMTrainConfig, resume: bool) -> None:
    out, start = Path(cfg.output_dir), time.time()
    accelerator = runtime.start_run(cfg, out)
    model = build_model(cfg)
    collator = build_collator(cfg, model, build_features(cfg, accelerator.device))
    optimizer = optim.adamw(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                            weight_decay=cfg.weight_decay, impl=cfg.optimizer_impl)
    optim.compile_modules(model.lm, enabled=cfg.compile)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ckpt = CheckpointManager(out, keep_last=cfg.keep_last)
    state, step = ckpt.resume(accelerator, resume)
    accelerator.init_trackers("train_llm", config=runtime.flat_dict(cfglib.to_dict(cfg)))
    logs = loop(cfg, accelerator, model, optimizer, scheduler, ckpt, step, resume_counters(state, accelerator),
                collator)
    written = export(model, accelerator, cfg)
    accelerator.end_training()
    if accelerator.is_main_process:
        terms = ", ".join(f"{k[5:]} {logs[k]:.4f}" for k in ("loss/ce", "loss/gmm") if k in logs)
        losses = f"final loss {logs['loss']:.4f} ({terms})" if logs else "no steps run"
        print(f"{cfg.stage}: wrote {', '.join(map(str, written))} after {cfg.total_steps} steps in "
              f"{time.time() - start:.0f} s; {losses}")


def main(argv=None) -> None:
    parser = cli.build_parser(__doc__.splitlines()[0], "runs/llm_<stage>")
    parser.add_argument("--stage", choices=sorted(STAGES), default=None,
                        help="training stage (default: the config's, else pretrain)")
    args, overrides = cli.parse(parser, argv)
    if args.stage is not None:
        overrides["stage"] = args.stage
    try:
        cfg = cli.resolve(LLMTrainConfig, args, overrides, expand=expand_presets)
    except (cfglib.ConfigError, ValueError, CheckpointError) as e:
        sys.exit(f"config error: {e}")
    if args.print_config:
        print(yaml.safe_dump(cfglib.to_dict(cfg), sort_keys=False))
        return
    try:
        check_inputs(cfg)
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        sys.exit(f"error: {e}")
    train(cfg, resume=args.resume)


if __name__ == "__main__":
    main()
