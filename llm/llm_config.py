"""Divot-LLM's config (DESIGN.md §4) and its two presets.

``tiny`` builds a random two-layer Mistral that trains on a 2-core CPU; ``paper`` has
Mistral-7B-v0.1's shapes (hidden 4096, 32 layers, 32 heads, 8 KV heads) and is meant to be
given ``base_path`` = a local Mistral-7B-Instruct-v0.1 directory. With ``base_path`` set, the
base model's own config decides the architecture (see :func:`sync_with_base`).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from divot import config as cfglib
from llm.gmm import NUM_COMPONENTS
from llm.text_tokenizer import NUM_QUERY_TOKENS

logger = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Fields that describe the Mistral architecture; a loaded base overrides them.
ARCH_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "max_position_embeddings", "rope_theta", "sliding_window")


@dataclass(frozen=True)
class LLMConfig:
    base_path: str | None = None       # local HF MistralForCausalLM dir; None = random from sizes below
    tokenizer_path: str | None = None  # None: base_path's tokenizer if it has one, else mistral-common v1
    # Mistral sizes, used when building from config (defaults: Mistral-7B-v0.1).
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    max_position_embeddings: int = 32768
    rope_theta: float = 10000.0
    sliding_window: int | None = 4096
    rms_norm_eps: float = 1e-5
    # Divot tokens and the GMM head.
    token_dim: int = 256
    num_query_tokens: int = NUM_QUERY_TOKENS
    gmm_components: int = NUM_COMPONENTS
    variance_scale: float = 0.1
    # Not in the paper: query blocks causal, each query reading the token drawn before it
    # (llm.model). The paper's block is bidirectional and draws all n tokens at once.
    autoregressive_queries: bool = False
    # Not in the paper: the input projector mixes each clip's tokens (llm.projectors).
    token_mixing: bool = False
    # Loss = ce_weight · CE + gmm_weight · GMM NLL/d (both 1 in the paper).
    ce_weight: float = 1.0
    gmm_weight: float = 1.0
    # LoRA on the attention and MLP projections.
    lora_r: int = 32
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = LORA_TARGETS
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    dtype: str = "float32"

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise cfglib.ConfigError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise cfglib.ConfigError(
                f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {self.attn_implementation!r}")
        if not self.lora_targets:
            raise cfglib.ConfigError("lora_targets is empty; Divot-LLM trains LoRA adapters")
        for name in ("token_dim", "num_query_tokens", "gmm_components", "lora_r", "hidden_size"):
            if getattr(self, name) <= 0:
                raise cfglib.ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise cfglib.ConfigError(f"hidden_size {self.hidden_size} is not a multiple of "
                                     f"num_attention_heads {self.num_attention_heads}")


LLM_PRESETS: dict[str, dict[str, Any]] = {
    # Mistral-7B-v0.1 / -Instruct-v0.1 shapes; give base_path for the real weights.
    "paper": {},
    # Forward + backward of 4 × ~150 tokens well under a second on 2 CPU cores.
    "tiny": {
        "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 2048, "sliding_window": None, "token_dim": 32,
        "token_mixing": True,
    },
}


def llm_config(preset: str = "tiny", **overrides) -> LLMConfig:
    """A preset's config with ``overrides`` (config field names) applied."""
    if preset not in LLM_PRESETS:
        raise ValueError(f"unknown LLM preset {preset!r}; available: {sorted(LLM_PRESETS)}")
    return cfglib.from_dict(LLMConfig, cfglib.merge(copy.deepcopy(LLM_PRESETS[preset]), overrides))


def mistral_config_kwargs(cfg: LLMConfig) -> dict[str, Any]:
    """Keyword arguments for ``transformers.MistralConfig`` (everything but the vocabulary)."""
    return {
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "max_position_embeddings": cfg.max_position_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "sliding_window": cfg.sliding_window, "rms_norm_eps": cfg.rms_norm_eps,
        "attn_implementation": cfg.attn_implementation,
    }


def sync_with_base(cfg: LLMConfig, base_config) -> LLMConfig:
    """``cfg`` with its architecture fields read off a loaded base's ``MistralConfig``.

    The projectors are sized from ``hidden_size``, so the config must describe the model that
    was actually loaded; a difference is logged, not an error, so a preset's defaults never
    block loading a base of another size.
    """
    rope = getattr(base_config, "rope_parameters", None) or {}
    actual = {name: getattr(base_config, name) for name in ARCH_FIELDS if name != "rope_theta"}
    actual["rope_theta"] = float(rope.get("rope_theta", cfg.rope_theta))
    actual["rms_norm_eps"] = float(base_config.rms_norm_eps)
    changed = {k: (getattr(cfg, k), v) for k, v in actual.items() if getattr(cfg, k) != v}
    if changed:
        logger.warning("base model %s differs from the config; using the base's values: %s", cfg.base_path,
                       ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
    return dataclasses.replace(cfg, **actual)
