#!/usr/bin/env python
"""Merge a Divot-LLM checkpoint's LoRA into its base and write a merged checkpoint.

    python scripts/merge_lora.py CKPT OUT

CKPT is a directory written by ``DivotLLM.save_pretrained`` (training layout). OUT receives
  OUT/llm/                  Hugging Face MistralForCausalLM + tokenizer (merged weights)
  OUT/input_projector/      OUT/output_projector/
  OUT/config.json           base_path "llm"
``DivotLLM.from_pretrained(OUT)`` then starts from the merged weights with a fresh LoRA, which
is how each SFT stage begins (DESIGN.md §4); ``MistralForCausalLM.from_pretrained(OUT/llm)``
loads the language model alone.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# Runnable from a source checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm.model import DivotLLM  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", type=Path, help="Divot-LLM training checkpoint directory")
    parser.add_argument("out", type=Path, help="output directory for the merged checkpoint")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out.resolve() == args.ckpt.resolve():
        raise SystemExit("OUT must differ from CKPT: the merged layout would mix with the LoRA one")
    start = time.time()
    model = DivotLLM.from_pretrained(args.ckpt)
    print(f"loaded {args.ckpt} ({model.num_parameters():,} parameters)")
    model.save_merged(args.out)
    for path in sorted(p for p in args.out.rglob("*") if p.is_file()):
        print(f"  wrote {path.relative_to(args.out)}  ({path.stat().st_size / 2**20:.1f} MiB)")
    print(f"merged checkpoint in {args.out} ({time.time() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
