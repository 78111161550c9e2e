"""The Mistral base of Divot-LLM: build or load it, grow its vocabulary, wrap it in LoRA.

DESIGN.md §4: LoRA (r 32, alpha 32, dropout 0.05) on q, k, v, o, gate, up, down; the RMSNorms,
the input embeddings and the LM head are trained in full; new token rows start at the mean of
the existing rows.

Decision (fully trained base parameters): they stay the base model's own parameters with
``requires_grad`` switched back on after ``get_peft_model`` froze them, rather than peft's
``modules_to_save``. ``modules_to_save`` keeps a second copy of each wrapped module (another
2 × 32070 × 4096 rows for the 7B embeddings and LM head) and renames their keys; with the
flag approach the parameter names stay the Hugging Face ones (``model.embed_tokens.weight``,
``lm_head.weight``, ``model.layers.0.input_layernorm.weight`` …), the checkpoint stores them
in one safetensors file under those names, and merging the LoRA leaves a plain
``MistralForCausalLM`` whose trained rows are already in place. peft's own adapter file then
holds the LoRA matrices only (``save_embedding_layers=False``).
"""
from __future__ import annotations

import logging

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import MistralConfig, MistralForCausalLM

from llm.llm_config import LLMConfig, mistral_config_kwargs

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_base(cfg: LLMConfig, vocab_size: int) -> MistralForCausalLM:
    """A random Mistral of ``cfg``'s sizes (``base_path`` None), or the one at ``base_path``."""
    dtype = TORCH_DTYPES[cfg.dtype]
    if cfg.base_path is None:
        mcfg = MistralConfig(vocab_size=vocab_size, **mistral_config_kwargs(cfg))
        return MistralForCausalLM(mcfg).to(dtype)
    logger.info("loading the LLM base from %s", cfg.base_path)
    try:
        return MistralForCausalLM.from_pretrained(cfg.base_path, local_files_only=True, dtype=dtype,
                                                  attn_implementation=cfg.attn_implementation)
    except OSError as e:
        raise FileNotFoundError(f"base_path {cfg.base_path}: not a loadable MistralForCausalLM "
                                f"directory ({e})") from e


@torch.no_grad()
def grow_vocab(model: MistralForCausalLM, vocab_size: int) -> int:
    """Resize embeddings and LM head to ``vocab_size`` rows; new rows = mean of the old ones.

    transformers' ``mean_resizing`` draws the new rows from a Gaussian around that mean;
    DESIGN.md asks for the mean itself, so resize plainly and overwrite. A model that
    already has enough rows (a merged Divot checkpoint) is left alone. Returns rows added.
    """
    old = model.get_input_embeddings().weight.shape[0]
    if vocab_size <= old:
        return 0
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    for module in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())}.values():
        weight = module.weight
        weight[old:] = weight[:old].float().mean(dim=0).to(weight.dtype)
    logger.info("vocabulary grown from %d to %d rows (new rows = mean of the old)", old, vocab_size)
    return vocab_size - old


def fully_trained_parameters(model: MistralForCausalLM) -> dict[str, nn.Parameter]:
    """The base parameters trained in full, by their Hugging Face names: RMSNorms, input
    embeddings, LM head. Works on the bare model and on the one peft injected LoRA into."""
    keep = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    keep |= {id(m) for m in model.modules() if type(m).__name__.endswith("RMSNorm")}
    out = {}
    for mod_name, module in model.named_modules():
        if id(module) in keep:
            for p_name, p in module.named_parameters(recurse=False):
                out[f"{mod_name}.{p_name}" if mod_name else p_name] = p
    return out


def lora_config(cfg: LLMConfig) -> LoraConfig:
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_targets), bias="none", task_type="CAUSAL_LM")


def wrap_lora(base: MistralForCausalLM, cfg: LLMConfig) -> PeftModel:
    """Inject a fresh LoRA (B = 0, so the wrapped model computes exactly what the base does)."""
    lm = get_peft_model(base, lora_config(cfg))
    if cfg.gradient_checkpointing:
        # Non-reentrant: works when only some inputs need grad and with peft's frozen base.
        # transformers 5.23 renamed the method (the old name warns); older releases lack the new one.
        base = lm.get_base_model()
        enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    return lm


def merge_lora(lm: PeftModel) -> MistralForCausalLM:
    """W ← W + (alpha / r) · B A in every target; returns the plain base model (in place)."""
    return lm.merge_and_unload()


def lora_parameters(lm: PeftModel) -> dict[str, nn.Parameter]:
    return {n: p for n, p in lm.named_parameters() if "lora_" in n}


def clean_base_name(peft_name: str) -> str:
    """``base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight`` →
    ``model.layers.0.self_attn.q_proj.weight`` (the Hugging Face name)."""
    prefix = "base_model.model."
    name = peft_name[len(prefix):] if peft_name.startswith(prefix) else peft_name
    return name.replace(".base_layer.", ".")


def base_parameters(lm: PeftModel) -> dict[str, nn.Parameter]:
    """Every base-model parameter (LoRA matrices excluded) by its Hugging Face name."""
    return {clean_base_name(n): p for n, p in lm.named_parameters() if "lora_" not in n}
