"""Divot-LLM: a Mistral with LoRA that reads and writes Divot tokens.

``from llm import DivotLLM, LLMConfig`` works; the model's heavy imports (transformers, peft)
load only when one of these names is first used, so ``from llm import gmm`` stays light.
Presets: ``from llm.llm_config import llm_config`` (the name ``llm.llm_config`` is the module).
"""
import importlib

_LAZY = {"DivotLLM": "llm.model", "DivotLLMOutput": "llm.model", "LLMConfig": "llm.llm_config"}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llm' has no attribute {name!r}")
