"""Divot: a diffusion-powered video tokenizer for comprehension and generation.

Building blocks live in submodules (``divot.tokenizer``, ``divot.detokenizer``,
``divot.video_io``, ``divot.shapes``, …); importing the package stays cheap.
"""
__version__ = "0.1.0"
