"""A tiny random Divot run (LLM checkpoint with pipeline.json, tokenizer, de-tokenizer) for tests.

Shared by the tests that need something :func:`divot.load` accepts; importing it from a test
module works because pytest puts ``tests/`` on ``sys.path`` (the folder is not a package).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from divot.detokenizer import DivotDetokenizer
from divot.presets import detokenizer_config, tokenizer_config
from divot.tokenizer import DivotTokenizer
from llm import text_tokenizer as tt
from llm.llm_config import llm_config
from llm.model import DivotLLM


def write_pipeline_json(ckpt: Path, tokenizer, detokenizer) -> None:
    (ckpt / "pipeline.json").write_text(json.dumps(
        {"tokenizer": str(tokenizer), "detokenizer": None if detokenizer is None else str(detokenizer)}))


def make_tiny_run(root: Path, *, detokenizer: bool = True, seed: int = 0) -> Path:
    """``root/llm`` (training layout + pipeline.json), ``root/tokenizer`` and, with
    ``detokenizer``, ``root/detokenizer``, all tiny and random; returns ``root``."""
    root = Path(root)
    torch.manual_seed(seed)
    DivotLLM(llm_config("tiny"), text_tokenizer=tt.load_text_tokenizer()).save_pretrained(root / "llm")
    DivotTokenizer(tokenizer_config("tiny")).save_pretrained(root / "tokenizer")
    if detokenizer:
        DivotDetokenizer(detokenizer_config("tiny")).save_pretrained(root / "detokenizer")
    write_pipeline_json(root / "llm", root / "tokenizer", root / "detokenizer" if detokenizer else None)
    return root
