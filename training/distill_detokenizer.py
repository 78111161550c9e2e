"""Distil the de-tokenizer into a one-step generator, adversarially (SF-V; DESIGN.md §6).

    accelerate launch training/distill_detokenizer.py                      # runs/tokenizer → runs/distill
    python training/distill_detokenizer.py --config training/configs/distill_tiny.yaml
    accelerate launch training/distill_detokenizer.py discriminator.heads=spatial \\
        --output-dir runs/distill_spatial                                    # SF-V's ablation
    accelerate launch --config_file training/configs/accelerate_8gpu_zero2.yaml \\
        training/distill_detokenizer.py teacher_dir=/ckpt/detokenizer tokenizer_dir=/ckpt/tokenizer \\
        data.source=folder data.jsonl=webvid.jsonl lr_generator=1e-5
    ... --resume                                                           # continue after an interruption

The generator starts as a copy of the trained de-tokenizer (``teacher_dir``); the
discriminator is the teacher's frozen U-Net encoder with trainable spatial and temporal
heads (:mod:`divot.discriminator`); the Divot tokenizer (``tokenizer_dir``) is frozen and
turns each clip into the generator's condition. Losses and noise levels: :mod:`divot.distill`.

One training step = one discriminator update, then one generator update, on the same clips.
Both live in one module trained by one optimizer (DeepSpeed drives one engine per
Accelerator), with two parameter groups: D's heads and G. In each phase the other group is
frozen (``requires_grad`` off through forward, backward and step) and its learning rate is 0
(the schedule), so a phase never moves it nor mixes its gradient into the clipping norm:
under plain torch / DDP (``find_unused_parameters``) the idle group has no gradient and AdamW
skips it; under DeepSpeed ZeRO-2/3 its gradient is filled with zeros and its rate is 0. The
default β1 = 0 (GAN practice) also keeps Adam's first moment of the idle group at 0.

The run directory holds ``config.yaml``, TensorBoard logs (``tb/``), ``metrics.jsonl``,
checkpoints (``checkpoints/step_*``) and, at the end, ``detokenizer/`` (the one-step
generator, ``one_step: true``, a drop-in for ``DivotDetokenizer.from_pretrained`` and
``divot.load(..., detokenizer=...)``) beside a copy of the frozen ``tokenizer/``, so the
directory also works with ``eval/reconstruction.py --checkpoint``.
"""
from __future__ import annotations

import json
import logging
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from accelerate.utils import DistributedDataParallelKwargs, DistributedType
from torch import nn
from tqdm.auto import tqdm

from divot import config as cfglib
from divot import distill
from divot.detokenizer import DetokenizerConfig, DivotDetokenizer
from divot.discriminator import HEAD_KINDS, Discriminator, DiscriminatorConfig, frozen_parameters
from divot.modeling import CheckpointError
from divot.tokenizer import DivotTokenizer
from training import cli, optim, runtime
from training.checkpoints import CheckpointManager
from training.optim import OptimizerImpl
from training.pretrain_tokenizer import build_loader, next_video
from training.tokenizer_setup import DataConfig

logger = logging.getLogger("distill_detokenizer")

PHASES = ("d", "g")  # order within a training step; parameter group i is updated in phase i


@dataclass(frozen=True)
class DistillTrainConfig:
    teacher_dir: str = "runs/tokenizer/detokenizer"
    tokenizer_dir: str = "runs/tokenizer/tokenizer"
    output_dir: str = "runs/distill"
    seed: int = 0
    batch_size: int = 4  # per process and micro-step
    gradient_accumulation_steps: int = 1  # a DeepSpeed config with an integer value wins
    # Defaults: the tiny preset on 2 CPU cores in a few minutes (an estimate: ~2 s a step at batch 4).
    steps: int = 100
    max_steps: int | None = None  # cap on `steps` (tests, smoke runs)
    lr_generator: float = 1e-4
    lr_discriminator: float = 2e-4
    warmup_steps: int = 10
    betas: tuple[float, float] = (0.0, 0.99)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    mixed_precision: str | None = None
    gradient_checkpointing: bool = False
    # Performance options (training/optim.py): AdamW kernels and in-place torch.compile.
    optimizer_impl: OptimizerImpl = "foreach"
    compile: bool = False
    log_every: int = 10
    save_every: int = 50
    keep_last: int = 2
    loss: distill.DistillLossConfig = field(default_factory=distill.DistillLossConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    data: DataConfig = field(default_factory=DataConfig)

    @property
    def total_steps(self) -> int:
        return self.steps if self.max_steps is None else min(self.steps, self.max_steps)


class DistillModule(nn.Module):
    """Frozen tokenizer + generator + discriminator: everything one DeepSpeed engine trains."""

    def __init__(self, tokenizer: DivotTokenizer, generator: DivotDetokenizer, discriminator: Discriminator,
                 loss: distill.DistillLossConfig):
        super().__init__()
        self.tokenizer = tokenizer.requires_grad_(False)
        self.generator = generator
        self.discriminator = discriminator
        self.loss_config = loss

    def train(self, mode: bool = True) -> "DistillModule":
        """Frozen parts stay in eval mode (no dropout in the tokenizer or D's encoder)."""
        super().train(mode)
        for frozen in (self.tokenizer, self.discriminator.front, self.discriminator.encoder):
            frozen.eval()
        return self

    def forward(self, video: torch.Tensor, phase: str) -> tuple[torch.Tensor, dict]:
        """The loss of ``phase`` ("d" or "g") on clips (b, f, 3, H, W), and detached terms to log."""
        with torch.no_grad():
            tokens = self.tokenizer(video)
            x0 = self.generator.to_x(video)
            context = self.discriminator.context(tokens)
        step = {"d": distill.discriminator_loss, "g": distill.generator_loss}.get(phase)
        if step is None:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        return step(self.generator, self.discriminator, x0, tokens, context, self.loss_config)


def check_inputs(cfg: DistillTrainConfig) -> None:
    """Fail before any run directory is made: missing model dirs, bad loss or head settings."""
    for what, path in (("teacher_dir", cfg.teacher_dir), ("tokenizer_dir", cfg.tokenizer_dir)):
        if not (Path(path) / cfglib.CONFIG_NAME).is_file():
            raise CheckpointError(f"{what}={path} is not a trained model directory (no config.json); train one "
                                  f"first: accelerate launch training/pretrain_tokenizer.py")
    teacher = cfglib.load_json(DetokenizerConfig, cfg.teacher_dir, drop=("_class",))
    distill.check_loss_config(cfg.loss, teacher.noise.num_train_timesteps)
    if cfg.discriminator.heads not in HEAD_KINDS:
        raise ValueError(f"discriminator.heads must be one of {HEAD_KINDS}, got {cfg.discriminator.heads!r}")


def build_model(cfg: DistillTrainConfig) -> DistillModule:
    """Tokenizer, generator (teacher copy, ``one_step=True``) and discriminator from local dirs."""
    tokenizer = DivotTokenizer.from_pretrained(cfg.tokenizer_dir).eval()
    generator = DivotDetokenizer.from_pretrained(cfg.teacher_dir, one_step=True)
    t, d = tokenizer.config, generator.config
    if (t.num_tokens, t.token_dim) != (d.num_tokens, d.token_dim):
        raise CheckpointError(f"tokenizer {cfg.tokenizer_dir} makes {t.num_tokens}×{t.token_dim} tokens but the "
                              f"de-tokenizer {cfg.teacher_dir} reads {d.num_tokens}×{d.token_dim}")
    if cfg.gradient_checkpointing:
        generator.unet.enable_gradient_checkpointing()
    disc = Discriminator(DivotDetokenizer.from_pretrained(cfg.teacher_dir), cfg.discriminator)
    logger.info("generator %.2fM trainable params, discriminator heads %.2fM (%s)",
                generator.num_parameters(True) / 1e6, sum(p.numel() for p in disc.head_parameters()) / 1e6,
                cfg.discriminator.heads)
    return DistillModule(tokenizer, generator, disc, cfg.loss)


def param_groups(model: DistillModule, cfg: DistillTrainConfig) -> list[dict]:
    """[D's heads, G], in the order of :data:`PHASES`."""
    gen = [p for p in model.generator.parameters() if p.requires_grad]
    return [{"params": model.discriminator.head_parameters(), "lr": cfg.lr_discriminator},
            {"params": gen, "lr": cfg.lr_generator}]


def phase_lambdas(cfg: DistillTrainConfig) -> list:
    """LR multipliers per group. The scheduler steps once per phase (2 per training step):
    call k is phase k % 2 of step k // 2; the other group's rate is 0, both warm up linearly."""
    def warm(k: int) -> float:
        return min(1.0, (k // len(PHASES) + 1) / max(1, cfg.warmup_steps))

    return [lambda k, i=i: warm(k) if k % len(PHASES) == i else 0.0 for i in range(len(PHASES))]


def allow_idle_parameters(accelerator):
    """Each phase leaves the other group without gradients: DDP must be told to expect that
    (before ``prepare``). DeepSpeed zero-fills them itself."""
    if accelerator.distributed_type in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
        accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True)
    return accelerator


def run_phase(cfg, accelerator, model, optimizer, scheduler, phase: str, videos: list) -> tuple[dict, float]:
    """One optimizer update of ``phase`` over the step's micro-batches; mean logged terms, grad norm.
    The other group is frozen throughout (forward, backward and step): it gets no gradient, so
    it neither moves nor enters the clipping norm, under every backend."""
    raw = accelerator.unwrap_model(model)
    idle = raw.generator.parameters() if phase == "d" else raw.discriminator.head_parameters()
    terms, grad_norm = [], None
    with frozen_parameters(idle):
        for video in videos:
            with accelerator.accumulate(model):
                loss, logs = model(video, phase=phase)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)  # None, not 0: AdamW then skips the idle group
            terms.append(logs)
    scheduler.step()  # once per phase (a no-op under DeepSpeed, whose engine steps it)
    mean = {k: torch.stack([t[k].float() for t in terms]).mean() for k in terms[0]}
    return mean, float(grad_norm) if grad_norm is not None else 0.0


def log_metrics(cfg, accelerator, step: int, window: list[dict], extra: dict) -> dict:
    """Means over the window and all ranks; TensorBoard + ``metrics.jsonl``. Collective."""
    keys = sorted(window[0])
    local = torch.stack([torch.stack([w[k] for w in window]).mean() for k in keys]).to(accelerator.device)
    means = accelerator.reduce(local, "mean").tolist()
    logs = {**dict(zip(keys, means)), **extra}
    accelerator.log(logs, step=step)
    if accelerator.is_main_process:
        with open(Path(cfg.output_dir) / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **logs}) + "\n")
    return logs


def loop(cfg, accelerator, model, optimizer, scheduler, ckpt, step: int, counters: dict) -> dict:
    gas, total = accelerator.gradient_accumulation_steps, cfg.total_steps
    teacher_cfg = accelerator.unwrap_model(model).generator.config
    # build_loader reads the clip size from a de-tokenizer config: hand it the teacher's.
    loader_cfg = types.SimpleNamespace(detokenizer=teacher_cfg, data=cfg.data, batch_size=cfg.batch_size,
                                       seed=cfg.seed)
    loader = iter(build_loader(loader_cfg, accelerator.process_index, accelerator.num_processes, step * gas))
    dtype, cache, window, logs, t0 = runtime.model_input_dtype(accelerator), {}, [], {}, time.time()
    bar = tqdm(total=total, initial=step, desc="distill", disable=not accelerator.is_main_process,
               dynamic_ncols=True)
    model.train()
    while step < total:
        videos = [next_video(loader, counters, cache).to(accelerator.device, dtype) for _ in range(gas)]
        merged, norms = {}, {}
        for phase in PHASES:
            terms, norms[phase] = run_phase(cfg, accelerator, model, optimizer, scheduler, phase, videos)
            merged.update(terms)
        window.append(merged)
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == total:
            clips = cfg.batch_size * gas * accelerator.num_processes * len(window)
            logs = log_metrics(cfg, accelerator, step, window, {
                "grad_norm/d": norms["d"], "grad_norm/g": norms["g"], "data/corrupt_total": counters["corrupt"],
                "clips_per_s": clips / max(time.time() - t0, 1e-6)})
            window, t0 = [], time.time()
            bar.set_postfix(d=f"{logs['loss_d']:.3f}", g_adv=f"{logs['g_adv']:.3f}", rec=f"{logs['g_recon']:.3f}")
        if step % cfg.save_every == 0 or step == total:
            ckpt.save(accelerator, step, {"counters": counters})
    bar.close()
    return logs


def export(model, accelerator, cfg: DistillTrainConfig) -> Path:
    """``detokenizer/`` (the one-step generator) and ``tokenizer/`` (complete weights, also under ZeRO-3)."""
    module, state = runtime.unwrap_for_save(accelerator, model)
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        for name, attr in (("detokenizer", "generator"), ("tokenizer", "tokenizer")):
            part, prefix = getattr(module, attr), attr + "."
            external = tuple(prefix + p for p in getattr(part, "external_prefixes", ()))  # e.g. the VAE
            part.save_pretrained(out / name, state_dict={k[len(prefix):]: v for k, v in state.items()
                                                         if k.startswith(prefix) and not k.startswith(external)})
    accelerator.wait_for_everyone()
    return out / "detokenizer"


def train(cfg: DistillTrainConfig, resume: bool) -> Path:
    out, start = Path(cfg.output_dir), time.time()
    accelerator = allow_idle_parameters(runtime.start_run(cfg, out))
    model = build_model(cfg)
    optimizer = optim.adamw(param_groups(model, cfg), lr=cfg.lr_generator, betas=cfg.betas,
                            weight_decay=cfg.weight_decay, impl=cfg.optimizer_impl)
    optim.compile_modules(model.generator.unet, model.discriminator, enabled=cfg.compile)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, phase_lambdas(cfg))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ckpt = CheckpointManager(out, keep_last=cfg.keep_last)
    state, step = ckpt.resume(accelerator, resume)
    counters = dict(state.get("counters", {})) if state else {"corrupt": 0, "skipped_batches": 0}
    accelerator.init_trackers("distill_detokenizer", config=runtime.flat_dict(cfglib.to_dict(cfg)))
    logs = loop(cfg, accelerator, model, optimizer, scheduler, ckpt, step, counters)
    written = export(model, accelerator, cfg)
    accelerator.end_training()
    if accelerator.is_main_process:
        summary = ", ".join(f"{k} {logs[k]:.4f}" for k in ("loss_d", "g_adv", "g_recon") if k in logs)
        print(f"wrote one-step de-tokenizer {written} after {cfg.total_steps} steps in "
              f"{time.time() - start:.0f} s" + (f"; {summary}" if summary else ""))
    return written


def main(argv=None) -> Path | None:
    parser = cli.build_parser(__doc__.splitlines()[0], "runs/distill")
    args, overrides = cli.parse(parser, argv)
    try:
        cfg = cli.resolve(DistillTrainConfig, args, overrides)
    except (cfglib.ConfigError, ValueError) as e:
        sys.exit(f"config error: {e}")
    if args.print_config:
        print(yaml.safe_dump(cfglib.to_dict(cfg), sort_keys=False))
        return None
    try:
        check_inputs(cfg)
    except (CheckpointError, cfglib.ConfigError, ValueError) as e:
        sys.exit(f"error: {e}")
    return train(cfg, resume=args.resume)


if __name__ == "__main__":
    main()
