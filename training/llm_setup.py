"""Pieces of Divot-LLM training: run config, stage presets, input checks, model, data, optimizer.

Stages (DESIGN.md §4): ``pretrain`` mixes video→caption (CE) and caption→video (GMM NLL);
``sft-comp`` fine-tunes comprehension on multiple-choice video QA (and optionally the user's
conversations) with the output projector frozen; ``sft-gen`` fine-tunes caption→video with
the input projector frozen. Each SFT stage starts from the merged pretrain weights
(``init_from``, default ``runs/llm_pretrain/merged``) with a fresh LoRA.

Resolution order of a run config: training preset (``tiny`` | ``paper``) ← stage defaults ←
YAML ← ``key=value`` overrides. The ``llm`` section merges over :func:`llm.llm_config.llm_config`
of the preset for ``pretrain``, and over the ``init_from`` checkpoint's own config for the SFT
stages (so ``config.yaml`` records the model that was actually trained).

Decision (weight decay): AdamW decays matrices only (LoRA, projector weights, embeddings,
LM head); RMSNorm gains and biases are not decayed, as usual for transformer fine-tuning.

Axis glossary: none (configs, datasets and optimizer groups; no tensor reshapes here).
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from divot import config as cfglib
from llm import checkpoint
from llm.collate import LLMCollator
from llm.data_sources import (DEFAULT_MAX_CLIPS, CaptionJsonlSource, ConversationSource, MixtureSource,
                              ShapesCaptionSource, ShapesGenerationSource, ShapesQASource)
from llm.features import ClipFeatures, load_clip_features
from llm.llm_config import LLMConfig, llm_config
from llm.model import STAGES, DivotLLM
from training.optim import OptimizerImpl
from training.tokenizer_setup import StepSampler

logger = logging.getLogger(__name__)

TASKS = ("caption", "generate", "qa", "chat")
SOURCES = ("shapes", "jsonl", "conversations")
PIPELINE_FILE = "pipeline.json"
TOKENIZER_COMMAND = "accelerate launch training/pretrain_tokenizer.py"


@dataclass(frozen=True)
class Ratios:
    """Relative share of each task in the mixture; 0 leaves a task out (DESIGN.md §4)."""
    caption: float = 0.0
    generate: float = 0.0
    qa: float = 0.0
    chat: float = 0.0


@dataclass(frozen=True)
class LLMDataConfig:
    # "shapes": built-in world (caption, generate, qa) | "jsonl": {video, caption} lines
    # (caption, generate) | "conversations": LLaVA-style json only (chat).
    source: str = "shapes"
    jsonl: str | None = None
    conversations: str | None = None  # with any source: adds the "chat" task (sft-comp)
    video_root: str | None = None
    ratios: Ratios = field(default_factory=Ratios)
    max_clips: int = DEFAULT_MAX_CLIPS  # 2-s clips per video at most
    max_length: int | None = None  # longest sequence; None = llm.max_position_embeddings
    shapes_seed: int = 0  # which Shapes world (the tokenizer's default world is seed 0)
    feature_batch_size: int = 16  # clips per tokenizer forward when features are computed


@dataclass(frozen=True)
class LLMTrainConfig:
    preset: str = "tiny"
    stage: str = "pretrain"
    output_dir: str = "runs/llm_pretrain"
    tokenizer_dir: str = "runs/tokenizer/tokenizer"  # the frozen Divot tokenizer
    feature_cache: str | None = None  # scripts/cache_features.py output; misses are computed
    init_from: str | None = None  # SFT: merged pretrain checkpoint
    seed: int = 0
    steps: int = 400  # optimizer steps; the LR schedule spans them
    max_steps: int | None = None  # stop early (tests, smoke runs); the schedule is unchanged
    batch_size: int = 4  # per process and micro-step
    gradient_accumulation_steps: int = 1  # a DeepSpeed config with an integer value wins
    lr: float = 1e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1  # cosine decays to lr · min_lr_ratio
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    mixed_precision: str | None = None  # None: the launcher's setting
    gradient_checkpointing: bool = False
    # Performance options (training/optim.py): AdamW kernels and in-place torch.compile.
    optimizer_impl: OptimizerImpl = "foreach"
    compile: bool = False
    log_every: int = 10
    save_every: int = 200
    keep_last: int = 2
    data: LLMDataConfig = field(default_factory=LLMDataConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)

    def __post_init__(self):
        if self.stage not in STAGES:
            raise cfglib.ConfigError(f"stage must be one of {sorted(STAGES)}, got {self.stage!r}")
        if self.data.source not in SOURCES:
            raise cfglib.ConfigError(f"data.source must be one of {SOURCES}, got {self.data.source!r}")
        for name in ("steps", "batch_size", "gradient_accumulation_steps", "log_every", "save_every"):
            if getattr(self, name) < 1:
                raise cfglib.ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def total_steps(self) -> int:
        return self.steps if self.max_steps is None else min(self.steps, self.max_steps)


# Run settings per training preset; tiny defaults run each stage in minutes on 2 CPU cores.
RUN_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},
    "paper": {"lr": 1e-4, "warmup_steps": 500, "min_lr_ratio": 0.0, "mixed_precision": "bf16",
              "steps": 20_000, "save_every": 1000, "log_every": 20},
}
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "pretrain": {"output_dir": "runs/llm_pretrain",
                 # video→caption 1.3, caption→video 1.0 (images are not part of the Shapes world)
                 "data": {"ratios": {"caption": 1.3, "generate": 1.0}}},
    "sft-comp": {"output_dir": "runs/llm_sft_comp", "init_from": "runs/llm_pretrain/merged",
                 "data": {"ratios": {"qa": 1.0, "chat": 1.0}}},
    "sft-gen": {"output_dir": "runs/llm_sft_gen", "init_from": "runs/llm_pretrain/merged",
                "data": {"ratios": {"generate": 1.0}}},
}
# Each SFT stage is shorter than pretraining, except video QA: the tiny LLM learns to read colour
# and count from the tokens within a few thousand questions, but with 800 (200 steps of 4) it
# barely beat the text-only control; motion, read through the projector's token mixing, takes
# 24,000 (0.66 → 0.80 from 750 to 1500 steps of 16). Batches of 16 cost less per sample than
# batches of 4 on a CPU (docs/RESULTS.md, "How many QA samples", "Token mixing"). Generation
# gets as many: 1500 steps of 16 put the prompt's colour in 0.44 of generated clips, 200 of 4 in
# 0.09 (docs/RESULTS.md, "An autoregressive query block does not fix it either").
TINY_SFT = {"steps": 200, "lr": 5e-4, "warmup_steps": 20, "save_every": 100}
TINY_SFT_STAGE = {"sft-comp": {"steps": 1500, "batch_size": 16, "save_every": 250},
                  "sft-gen": {"steps": 1500, "batch_size": 16, "save_every": 250}}


def expand_presets(data: dict[str, Any]) -> dict[str, Any]:
    """Preset and stage defaults under the user's keys, and the resolved ``llm`` section."""
    preset, stage = data.get("preset", "tiny"), data.get("stage", "pretrain")
    if preset not in RUN_PRESETS:
        raise cfglib.ConfigError(f"preset must be one of {sorted(RUN_PRESETS)}, got {preset!r}")
    if stage not in STAGE_DEFAULTS:
        raise cfglib.ConfigError(f"stage must be one of {sorted(STAGE_DEFAULTS)}, got {stage!r}")
    defaults = cfglib.merge(copy.deepcopy(RUN_PRESETS[preset]), STAGE_DEFAULTS[stage])
    if preset == "tiny" and stage != "pretrain":
        defaults = cfglib.merge(defaults, cfglib.merge(TINY_SFT, TINY_SFT_STAGE.get(stage, {})))
    out = cfglib.merge(defaults, data)
    user_llm = dict(data.get("llm") or {})
    if "gradient_checkpointing" in user_llm:
        raise cfglib.ConfigError("set gradient_checkpointing=true (top level), not llm.gradient_checkpointing")
    user_llm["gradient_checkpointing"] = bool(out.get("gradient_checkpointing", False))
    init_cfg = _init_config(out.get("init_from")) if stage != "pretrain" else None
    if stage != "pretrain":
        # One YAML may serve every stage: its base model is the pretrain stage's; SFT builds on
        # the merged weights in init_from.
        ignored = {k: user_llm.pop(k) for k in ("base_path", "tokenizer_path") if k in user_llm}
        if ignored:
            logger.warning("stage %s starts from init_from; ignoring llm.%s", stage, ", llm.".join(ignored))
    if init_cfg is None:
        out["llm"] = cfglib.to_dict(llm_config(preset, **user_llm))
    else:
        out["llm"] = cfglib.to_dict(cfglib.from_dict(LLMConfig, cfglib.merge(cfglib.to_dict(init_cfg), user_llm)))
    return out


def _init_config(init_from: str | None) -> LLMConfig | None:
    """The merged checkpoint's config, or None when there is none yet (``check_inputs`` says so)."""
    if init_from is None or not (Path(init_from) / cfglib.CONFIG_NAME).is_file():
        return None
    cfg, _ = checkpoint.read_config(init_from)
    return cfg


# ------------------------------------------------------------------ input checks
def check_inputs(cfg: LLMTrainConfig) -> None:
    """Clear errors for what an earlier step should have produced, before anything is built."""
    tok = Path(cfg.tokenizer_dir)
    if not (tok / cfglib.CONFIG_NAME).is_file() or not (tok / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"no trained Divot tokenizer at tokenizer_dir={cfg.tokenizer_dir} (config.json + "
            f"model.safetensors): run `{TOKENIZER_COMMAND}` first (it writes runs/tokenizer/tokenizer), "
            f"or set tokenizer_dir=DIR")
    tok_cfg = json.loads((tok / cfglib.CONFIG_NAME).read_text())
    if tok_cfg.get("token_dim") != cfg.llm.token_dim or tok_cfg.get("num_tokens") != cfg.llm.num_query_tokens:
        raise ValueError(f"the tokenizer at {tok} makes {tok_cfg.get('num_tokens')}×{tok_cfg.get('token_dim')} "
                         f"tokens but the LLM expects {cfg.llm.num_query_tokens}×{cfg.llm.token_dim}; "
                         f"use a tokenizer of the same preset ({cfg.preset}) or set llm.token_dim")
    if cfg.stage == "pretrain":
        if cfg.init_from is not None:
            raise ValueError("init_from is for the SFT stages; pretrain starts from llm.base_path (or random)")
        return
    if cfg.init_from is None:
        raise ValueError(f"stage {cfg.stage} needs init_from=DIR, a merged pretrain checkpoint")
    init = Path(cfg.init_from)
    if not (init / cfglib.CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"no merged pretrain checkpoint at init_from={cfg.init_from}: run the pretrain stage first "
            f"(`accelerate launch training/train_llm.py --stage pretrain`, which writes OUT/merged), "
            f"or set init_from=DIR")
    _, layout = checkpoint.read_config(init)
    if layout != "merged":
        raise ValueError(f"init_from={cfg.init_from} is a {layout!r} training checkpoint; SFT starts from a "
                         f"merged one (OUT/merged of the pretrain stage, or scripts/merge_lora.py CKPT OUT)")


# ------------------------------------------------------------------ model and optimizer
def build_model(cfg: LLMTrainConfig) -> DivotLLM:
    """Pretrain: a fresh model of ``cfg.llm``. SFT: the merged weights (``cfg.llm.base_path``
    points into ``init_from``) with a fresh LoRA, projectors loaded from ``init_from``."""
    model = DivotLLM(cfg.llm)
    if cfg.stage != "pretrain":
        checkpoint.load_weights(model, cfg.init_from, "merged")
    model.set_stage(cfg.stage)
    return model


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, plain = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else plain).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def lr_multiplier(cfg: LLMTrainConfig):
    """Linear warm-up to ``lr``, then a cosine down to ``lr · min_lr_ratio`` at ``steps``."""
    def fn(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return fn


# ------------------------------------------------------------------ data
def build_sources(cfg: LLMTrainConfig) -> dict[str, Dataset]:
    """Each task with a positive ratio that the configured source can provide."""
    d = cfg.data
    available: dict[str, Any] = {}
    if d.source == "shapes":
        available = {"caption": lambda: ShapesCaptionSource("train", seed=d.shapes_seed),
                     "generate": lambda: ShapesGenerationSource("train", seed=d.shapes_seed),
                     "qa": lambda: ShapesQASource("train", seed=d.shapes_seed)}
    elif d.source == "jsonl":
        if not d.jsonl:
            raise ValueError('data.source=jsonl needs data.jsonl=PATH (lines of {"video", "caption"})')
        available = {task: (lambda t=task: CaptionJsonlSource(d.jsonl, d.video_root, tasks=(t,),
                                                               max_clips=d.max_clips, seed=cfg.seed))
                     for task in CaptionJsonlSource.TASKS}
    elif not d.conversations:
        raise ValueError("data.source=conversations needs data.conversations=PATH (LLaVA-style json)")
    if d.conversations:
        available["chat"] = lambda: ConversationSource(d.conversations, d.video_root, max_clips=d.max_clips)
    wanted = {task: getattr(d.ratios, task) for task in TASKS if getattr(d.ratios, task) > 0}
    unavailable = sorted(set(wanted) - set(available))
    if unavailable:
        logger.warning("data.source=%s provides no %s samples: left out of the mixture", d.source, unavailable)
    sources = {task: available[task]() for task in wanted if task in available}
    if not sources:
        raise ValueError(f"stage {cfg.stage}: no training data (ratios {wanted}, source {d.source!r} provides "
                         f"{sorted(available)}); set data.ratios.TASK=… for a task the source provides")
    logger.info("data mixture: %s", {t: getattr(d.ratios, t) for t in sources})
    return sources


def build_features(cfg: LLMTrainConfig, device: torch.device) -> ClipFeatures:
    """The frozen tokenizer (and the feature cache, if any) as a refs → tokens function."""
    return load_clip_features(cfg.tokenizer_dir, cfg.feature_cache, device,
                              batch_size=cfg.data.feature_batch_size)


def build_loader(cfg: LLMTrainConfig, collator: LLMCollator, rank: int, world: int, start: int) -> DataLoader:
    """Micro-batches as a pure function of their position (``start`` = micro-batches already
    read by this rank), so a resumed run reads exactly what the interrupted one would have."""
    sources = build_sources(cfg)
    ratios = {task: getattr(cfg.data.ratios, task) for task in sources}
    # Mixture items are already random draws: the sampler walks them in order.
    mixture = MixtureSource(sources, ratios, length=10**15, seed=cfg.seed)
    sampler = StepSampler(len(mixture), cfg.batch_size, rank, world, cfg.seed, start, shuffle=False)
    # Own generator: creating the iterator must not draw from the (restored) global RNG.
    # num_workers=0: the collator holds the tokenizer and runs it (see llm.collate).
    return DataLoader(mixture, batch_size=cfg.batch_size, sampler=sampler, num_workers=0, collate_fn=collator,
                      generator=torch.Generator().manual_seed(cfg.seed))


def build_collator(cfg: LLMTrainConfig, model: DivotLLM, features: ClipFeatures) -> LLMCollator:
    max_length = cfg.data.max_length or model.config.max_position_embeddings
    return LLMCollator(model.text_tokenizer, features, model.config.num_query_tokens, max_length=max_length)


# ------------------------------------------------------------------ exports
def pipeline_info(tokenizer_dir: str | os.PathLike) -> dict[str, str | None]:
    """What inference needs beside the LLM: the tokenizer and, if present, its sibling de-tokenizer."""
    tok = Path(tokenizer_dir).resolve()
    detok = tok.parent / "detokenizer"
    return {"tokenizer": str(tok), "detokenizer": str(detok) if (detok / cfglib.CONFIG_NAME).is_file() else None}
