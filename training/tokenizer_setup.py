"""Pieces of tokenizer training: run config, the joint model, the two-stage schedule, data.

Paper recipe (DESIGN.md §3, appendix): stage 1 trains tokenizer (not a frozen
ViT) and U-Net end to end with the v-prediction loss and no condition dropout;
stage 2 freezes the tokenizer and fine-tunes the U-Net with 5% condition dropout
so that classifier-free guidance works. Both stages run in one process with one
optimizer: the tokenizer's parameter group gets learning rate 0 in stage 2,
which freezes it exactly (AdamW's step and decay are both scaled by the rate)
and keeps the DeepSpeed engine unchanged between stages.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from divot import config as cfglib
from divot import presets
from divot.conditioning import TaskMix
from divot.detokenizer import DetokenizerConfig, DivotDetokenizer
from divot.finetune import check_trainable, freeze_all_but_temporal
from divot.modeling import WEIGHTS_NAME, CheckpointError, load_state_dict_strict
from divot.pixel_head import is_legacy_layout
from divot.tokenizer import DivotTokenizer, TokenizerConfig
from training import runtime
from training.optim import OptimizerImpl

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageConfig:
    steps: int
    lr: float
    warmup_steps: int = 50
    cond_dropout: float = 0.0
    min_lr_ratio: float = 0.1
    timestep_shift: float = 1.0  # > 1 favours high noise levels (SD3 shift); 1 = uniform
    # Stage 1 only: the tokenizer's learning rate stays 0 for this many steps, then warms up
    # (a decoder-first start; docs/TOKENIZER_TRAINING.md, findings 3 and 10).
    tokenizer_delay_steps: int = 0
    # Stage 1 only: the tokenizer's learning rate as a share of ``lr``. Adam moves every weight by
    # about lr per step, so at lr 1e-3 a fresh tokenizer zeroes its clip-dependent paths within
    # ~50 steps, before anything reads its tokens; at 3 % the reader comes first (finding 11).
    tokenizer_lr_scale: float = 1.0


@dataclass(frozen=True)
class DataConfig:
    source: str = "shapes"  # "shapes" (built-in world) | "folder" ({video, caption} jsonl)
    jsonl: str | None = None
    video_root: str | None = None
    num_workers: int = 0
    random_start: bool = True


@dataclass(frozen=True)
class TokenizerTrainConfig:
    preset: str = "tiny"
    output_dir: str = "runs/tokenizer"
    seed: int = 0
    batch_size: int = 4  # per process and micro-step
    gradient_accumulation_steps: int = 1  # a DeepSpeed config with an integer value wins
    max_steps: int | None = None  # cap on stage1 + stage2 optimizer steps (tests, smoke runs)
    # Defaults: the tiny preset on 2 CPU cores in under 15 minutes (docs/RESULTS.md). Stage 1
    # trains tokenizer and de-tokenizer end to end, the tokenizer at 3 % of the learning rate:
    # at the full rate its tokens collapse before the de-tokenizer reads them; and it spends
    # more steps at high noise, where only the tokens can say what to draw
    # (docs/TOKENIZER_TRAINING.md, findings 10-12).
    stage1: StageConfig = field(default_factory=lambda: StageConfig(
        steps=750, lr=1e-3, warmup_steps=50, timestep_shift=2.0, tokenizer_lr_scale=0.03))
    stage2: StageConfig = field(default_factory=lambda: StageConfig(steps=150, lr=3e-4, warmup_steps=20,
                                                                    cond_dropout=0.05))
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    mixed_precision: str | None = None
    per_frame_prob: float = 0.0  # share of clips with independent per-frame noise levels
    # UniCon task masks (DESIGN.md §6): share of clips whose known frames (image-to-video, prediction,
    # interpolation, drawn from known_frames_tasks) enter clean at t = 0 and are left out of the loss.
    known_frames_prob: float = 0.0
    known_frames_tasks: TaskMix = field(default_factory=TaskMix)
    gradient_checkpointing: bool = False
    # Performance options (training/optim.py): AdamW kernels and in-place torch.compile.
    optimizer_impl: OptimizerImpl = "foreach"
    compile: bool = False
    # Start from a trained run: its tokenizer/ + detokenizer/, or one of its checkpoints/step_* dirs
    # (model configs must match this run's). "temporal": only the de-tokenizer's temporal layers
    # train, tokenizer and all else frozen (DESIGN.md §6, after "Frame by Familiar Frame").
    init_from: str | None = None
    detokenizer_trainable: Literal["all", "temporal"] = "all"
    log_every: int = 10
    save_every: int = 250
    keep_last: int = 2
    sample_every: int = 500
    sample_clips: int = 4
    sample_steps: int = 25
    sampler: str = "ddim"
    guidance_scale: float = 2.0  # tiny; sweep in docs/TOKENIZER_TRAINING.md, finding 12
    guidance_rescale: float = 0.7
    # Previews and the exported weights use a moving average of the weights (training/ema.py;
    # finding 16: +0.6 dB PSNR on the default run); 0 = off. Warm-up: a 900-step run ends near 0.99.
    ema_decay: float = 0.999
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    detokenizer: DetokenizerConfig = field(default_factory=DetokenizerConfig)

    @property
    def total_steps(self) -> int:
        total = self.stage1.steps + self.stage2.steps
        return total if self.max_steps is None else min(total, self.max_steps)


PAPER_OVERRIDES: dict[str, Any] = {
    # Published setting (DESIGN.md §3/§4): lr 1e-4, guidance 7.5 with rescale 0.7.
    "batch_size": 4,
    "stage1": {"steps": 100_000, "lr": 1e-4, "warmup_steps": 500, "timestep_shift": 1.0, "tokenizer_delay_steps": 0,
               "tokenizer_lr_scale": 1.0},
    "stage2": {"steps": 50_000, "lr": 1e-4, "warmup_steps": 500, "cond_dropout": 0.05},
    "guidance_scale": 7.5, "sample_steps": 50, "mixed_precision": "bf16", "weight_decay": 0.05, "ema_decay": 0.9999,
    "sample_every": 2000, "save_every": 2000,
}


def expand_presets(data: dict[str, Any]) -> dict[str, Any]:
    """Fill ``tokenizer``/``detokenizer`` (and paper run settings) from ``preset``, user keys winning."""
    preset = data.get("preset", "tiny")
    out = cfglib.merge(PAPER_OVERRIDES, data) if preset == "paper" else dict(data)
    out["tokenizer"] = cfglib.to_dict(presets.tokenizer_config(preset, **data.get("tokenizer", {})))
    out["detokenizer"] = cfglib.to_dict(presets.detokenizer_config(preset, **data.get("detokenizer", {})))
    return out


class TokenizerAutoencoder(nn.Module):
    """Tokenizer + de-tokenizer as one trainable module (one DeepSpeed engine for both stages)."""

    def __init__(self, tokenizer: DivotTokenizer, detokenizer: DivotDetokenizer):
        super().__init__()
        self.tokenizer = tokenizer
        self.detokenizer = detokenizer

    def forward(self, video: torch.Tensor, train_tokenizer: bool = True, cond_dropout: float = 0.0,
                per_frame_prob: float = 0.0, timestep_shift: float = 1.0, known_frames_prob: float = 0.0,
                task_mix: TaskMix | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the loss and the tokens' spread across the batch (≈ 0 means collapsed tokens)."""
        with torch.set_grad_enabled(train_tokenizer and torch.is_grad_enabled()):
            tokens = self.tokenizer(video)
        loss = self.detokenizer.training_loss(video, tokens, cond_dropout=cond_dropout,
                                              per_frame_prob=per_frame_prob, timestep_shift=timestep_shift,
                                              known_frames_prob=known_frames_prob, task_mix=task_mix)
        spread = tokens.detach().float().std(dim=0).mean() if tokens.shape[0] > 1 else tokens.new_zeros(())
        return loss, spread

    @torch.no_grad()
    def refresh_null_tokens(self) -> None:
        """Unconditional input for guidance = the tokens of an all-grey (zero) clip (DESIGN.md §3)."""
        cfg = self.detokenizer.config
        ref = next(self.detokenizer.parameters())
        grey = torch.zeros(1, self.tokenizer.config.num_frames, 3, cfg.frame_size, cfg.frame_size,
                           device=ref.device, dtype=ref.dtype)
        self.detokenizer.null_tokens.copy_(self.tokenizer(grey).to(self.detokenizer.null_tokens.dtype))


def param_groups(model: TokenizerAutoencoder, weight_decay: float) -> list[dict]:
    """Two groups, tokenizer first, so the schedule can freeze it in stage 2."""
    groups = []
    for part in (model.tokenizer, model.detokenizer):
        params = [p for p in part.parameters() if p.requires_grad]
        groups.append({"params": params, "weight_decay": weight_decay})
    return groups


def _warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def stage_lambdas(cfg: TokenizerTrainConfig) -> list:
    """LR multipliers (relative to stage1.lr) for [tokenizer group, de-tokenizer group]."""
    s1, s2 = cfg.stage1, cfg.stage2

    def tokenizer_lr(step: int) -> float:
        delay = s1.tokenizer_delay_steps
        if step < delay or step >= s1.steps:
            return 0.0
        return s1.tokenizer_lr_scale * _warmup_cosine(step - delay, s1.warmup_steps, s1.steps - delay,
                                                      s1.min_lr_ratio)

    def detokenizer_lr(step: int) -> float:
        if step < s1.steps:
            return _warmup_cosine(step, s1.warmup_steps, s1.steps, s1.min_lr_ratio)
        scale = s2.lr / s1.lr
        return scale * _warmup_cosine(step - s1.steps, s2.warmup_steps, s2.steps, s2.min_lr_ratio)

    return [tokenizer_lr, detokenizer_lr]


def stage_of(cfg: TokenizerTrainConfig, step: int) -> tuple[int, StageConfig]:
    return (1, cfg.stage1) if step < cfg.stage1.steps else (2, cfg.stage2)


class StepSampler(torch.utils.data.Sampler):
    """Yields dataset indices as a pure function of the global step, so a resumed run reads
    exactly the clips the interrupted run would have read next (rule 5).

    Process ``rank`` of ``world`` takes the slice ``[(s·world + rank)·B, … + B)`` of an
    epoch-wise seeded permutation; the built-in Shapes world is effectively infinite, so its
    index is used directly.
    """

    def __init__(self, length: int, batch_size: int, rank: int, world: int, seed: int,
                 start_step: int = 0, shuffle: bool = True):
        self.length, self.b, self.rank, self.world = length, batch_size, rank, world
        self.seed, self.start_step, self.shuffle = seed, start_step, shuffle
        self._perm: tuple[int, torch.Tensor] | None = None

    def _index(self, flat: int) -> int:
        epoch, pos = divmod(flat, self.length)
        if not self.shuffle:
            return pos
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.length, generator=g))
        return int(self._perm[1][pos])

    def __iter__(self) -> Iterator[int]:
        step = self.start_step
        while True:
            base = (step * self.world + self.rank) * self.b
            for i in range(self.b):
                yield self._index(base + i)
            step += 1

    def __len__(self) -> int:  # infinite stream; DataLoader only needs a number
        return 2 ** 62


def optimizer_groups(model: TokenizerAutoencoder, cfg: TokenizerTrainConfig) -> tuple[list[dict], list]:
    """:func:`param_groups` with their :func:`stage_lambdas`, leaving out a part with nothing to
    train (the frozen tokenizer of temporal-only fine-tuning): the optimizer gets trainable
    parameters only, and DeepSpeed ZeRO cannot flatten an empty group."""
    pairs = [(g, f) for g, f in zip(param_groups(model, cfg.weight_decay), stage_lambdas(cfg)) if g["params"]]
    return [g for g, _ in pairs], [f for _, f in pairs]


# ------------------------------------------------------------------ starting from a trained run
INIT_PATH_KEYS = ("vit.checkpoint", "vae_path")  # where local weights live: not part of the model
_PARTS = {"tokenizer": TokenizerConfig, "detokenizer": DetokenizerConfig}


def _is_run_dir(init: Path) -> bool:
    return all((init / part / cfglib.CONFIG_NAME).is_file() for part in _PARTS)


def init_model_configs(init: Path) -> dict[str, dict]:
    """The tokenizer / de-tokenizer configs (plain dicts) a run directory or checkpoint was made with."""
    if _is_run_dir(init):
        saved = {part: json.loads((init / part / cfglib.CONFIG_NAME).read_text()) for part in _PARTS}
        return {part: {k: v for k, v in data.items() if k != "_class"} for part, data in saved.items()}
    if (init / WEIGHTS_NAME).is_file():
        run_file = init.parent.parent / "config.yaml"  # RUN/checkpoints/step_*/ → RUN/config.yaml
        if not run_file.is_file():
            raise CheckpointError(f"init_from {init}: a training checkpoint, but its run's {run_file} is missing, "
                                  "so its model configs cannot be checked")
        run = cfglib.load_yaml(run_file)
        return {part: run.get(part, {}) for part in _PARTS}
    hint = (f"; it has checkpoints/: name one ({init}/checkpoints/step_…) or finish the run with --resume"
            if (init / "checkpoints").is_dir() else "")
    raise CheckpointError(f"init_from {init}: neither a run directory with tokenizer/ and detokenizer/ "
                          f"(config.json + {WEIGHTS_NAME}) nor a training checkpoint with {WEIGHTS_NAME}{hint}")


def check_init_from(cfg: TokenizerTrainConfig) -> None:
    """Clear errors, before anything is built, for a bad ``detokenizer_trainable`` or an ``init_from``
    that is missing or was trained with other model configs than ``cfg``'s."""
    check_trainable(cfg.detokenizer_trainable)
    if cfg.init_from is None:
        return
    init = Path(cfg.init_from)
    if not init.is_dir():
        raise CheckpointError(f"init_from {init}: no such directory")
    saved, diffs = init_model_configs(init), []
    for part, cls in _PARTS.items():
        try:
            theirs = runtime.flat_dict(cfglib.to_dict(cfglib.from_dict(cls, saved[part])))
        except cfglib.ConfigError as e:
            raise cfglib.ConfigError(f"init_from {init}: its {part} config does not load: {e}") from e
        ours = runtime.flat_dict(cfglib.to_dict(getattr(cfg, part)))
        diffs += [f"{part}.{k}: init {theirs.get(k)!r}, this run {ours.get(k)!r}"
                  for k in sorted(set(theirs) | set(ours)) if k not in INIT_PATH_KEYS and theirs.get(k) != ours.get(k)]
    if diffs:
        raise cfglib.ConfigError(f"init_from {init} was trained with other model configs:\n  " + "\n  ".join(diffs)
                                 + "\nset those keys to the init run's values (KEY=VALUE overrides, or a --config "
                                 "YAML with its tokenizer/detokenizer sections: init_model_overrides)")


def init_model_overrides(init: str | Path) -> dict[str, dict]:
    """``{"tokenizer": {...}, "detokenizer": {...}}`` with every model field of an init run (fields added
    since it was saved at their dataclass defaults): merged into a ``--config`` YAML, the resolved model
    configs equal the run's whatever the presets say now."""
    saved = init_model_configs(Path(init))
    return {part: cfglib.to_dict(cfglib.from_dict(cls, saved[part])) for part, cls in _PARTS.items()}


def _with_aliases(module: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` plus the names accelerate drops when it saves shared tensors once (diffusers'
    ``Downsample2D`` registers one convolution as both ``conv`` and ``Conv2d_0``)."""
    names_by_storage: dict[int, list[str]] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        if tensor.numel():
            names_by_storage.setdefault(tensor.data_ptr(), []).append(name)
    out = dict(state)
    for names in names_by_storage.values():
        saved = [n for n in names if n in state]
        for name in names if saved else ():
            out.setdefault(name, state[saved[0]])
    return out


def load_init(cfg: TokenizerTrainConfig) -> TokenizerAutoencoder:
    """The joint model with ``cfg.init_from``'s weights (paths such as ``vae_path`` from ``cfg``)."""
    check_init_from(cfg)
    init = Path(cfg.init_from)
    if _is_run_dir(init):
        tokenizer = DivotTokenizer.from_pretrained(init / "tokenizer", vit=cfg.tokenizer.vit)
        detokenizer = DivotDetokenizer.from_pretrained(init / "detokenizer", vae_path=cfg.detokenizer.vae_path)
        model = TokenizerAutoencoder(tokenizer, detokenizer)
    else:  # accelerate checkpoint: one file of tokenizer.* and detokenizer.* keys
        model = TokenizerAutoencoder(DivotTokenizer(cfg.tokenizer), DivotDetokenizer(cfg.detokenizer))
        state = load_file(str(init / WEIGHTS_NAME))
        for part in _PARTS:  # per part: the de-tokenizer's own load_state_dict re-adds its VAE
            own = {k[len(part) + 1:]: v for k, v in state.items() if k.startswith(part + ".")}
            module = getattr(model, part)
            load_state_dict_strict(module, _with_aliases(module, own), f"{init / WEIGHTS_NAME} ({part}.*)")
    logger.info("initialised tokenizer and de-tokenizer from %s", init)
    return model


def check_resumable(path: Path) -> None:
    """A training checkpoint whose de-tokenizer was saved in an earlier layout cannot be resumed:
    its weights convert on load (``DivotDetokenizer.upgrade_state_dict``), its optimizer state
    does not. Say so, and how to go on from it, before accelerate fails on the key names."""
    weights = path / WEIGHTS_NAME
    if not weights.is_file():  # DeepSpeed checkpoints keep their own layout
        return
    with safe_open(str(weights), "pt") as f:
        keys = set(f.keys())
    if is_legacy_layout(keys, "detokenizer.pixel_head."):
        raise CheckpointError(f"{path} holds a pixel head in its first layout (code before commit 0397c47, "
                              "divot/pixel_head.py): its weights convert on load, its optimizer state does not, so "
                              f"it cannot be resumed. Go on from it as a new run: init_from={path} "
                              "(the learning-rate schedule starts over), or resume it with that older code.")


def build_model(cfg: TokenizerTrainConfig) -> TokenizerAutoencoder:
    """The joint model: fresh or from ``init_from``; with ``detokenizer_trainable="temporal"`` the
    tokenizer and every non-temporal de-tokenizer parameter are frozen (``requires_grad=False``)."""
    check_trainable(cfg.detokenizer_trainable)
    if cfg.init_from is None:
        model = TokenizerAutoencoder(DivotTokenizer(cfg.tokenizer), DivotDetokenizer(cfg.detokenizer))
    else:
        model = load_init(cfg)
    if cfg.detokenizer_trainable == "temporal":
        model.tokenizer.requires_grad_(False)
        trainable, total = freeze_all_but_temporal(model.detokenizer)
        logger.info("temporal-only fine-tuning: tokenizer frozen, %.3fM of %.3fM de-tokenizer parameters train",
                    trainable / 1e6, total / 1e6)
    return model
