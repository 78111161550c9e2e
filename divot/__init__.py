"""Divot: a diffusion-powered video tokenizer for comprehension and generation.

Building blocks live in submodules (``divot.tokenizer``, ``divot.detokenizer``,
``divot.video_io``, ``divot.shapes``, …); importing the package stays cheap.
"""
__version__ = "0.1.0"

_PIPELINE_API = ("generate", "load", "DivotPipeline")


def __getattr__(name: str):
    # ``divot.generate`` (llm.api), ``divot.load`` / ``divot.DivotPipeline`` (llm.pipeline) live in llm,
    # which builds on this package (dependencies flow divot ← llm). They are imported here on
    # first use only (PEP 562): the divot/ building blocks must never import llm at module
    # import time, and ``import divot`` stays cheap.
    if name == "generate":
        from llm import api
        return api.generate
    if name in _PIPELINE_API:
        from llm import pipeline
        return getattr(pipeline, name)
    raise AttributeError(f"module 'divot' has no attribute {name!r}")
