"""One-call Divot API: ``divot.generate(prompt, videos=None, ...)`` with cached pipelines.

    import divot
    divot.generate("a red circle moves to the left", output="out.mp4", seed=0)      # → GeneratedVideo
    divot.generate("What colour is the shape?", videos="clip.mp4")                  # → str

The loaded :class:`llm.pipeline.DivotPipeline` is kept per checkpoint and load options, so
repeated calls reuse it; ``clear_cache()`` releases it.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

from llm.chat import GeneratedVideo, Video, as_video_list
from llm.pipeline import GENERATION_CHECKPOINTS, DivotPipeline, find_checkpoint, load

# Loaded pipelines by (checkpoint, load options). One at a time: a second 7B model would not
# fit beside the first on most GPUs, so switching checkpoints releases the previous one.
_CACHE: OrderedDict[tuple, DivotPipeline] = OrderedDict()
CACHE_SIZE = 1
_LOAD_KEYS = ("tokenizer", "detokenizer", "device", "dtype", "max_clips")


def get_pipeline(checkpoint: str | os.PathLike | None = None, **load_kw) -> DivotPipeline:
    """:func:`load`, remembered per checkpoint and options so repeated calls reuse it."""
    ckpt = (find_checkpoint() if checkpoint is None else Path(checkpoint)).resolve()
    key = (str(ckpt), *(repr(load_kw.get(k)) for k in _LOAD_KEYS))
    if key not in _CACHE:
        while len(_CACHE) >= max(CACHE_SIZE, 1):
            _CACHE.popitem(last=False)
        _CACHE[key] = load(ckpt, **load_kw)
    _CACHE.move_to_end(key)
    return _CACHE[key]


def clear_cache() -> None:
    _CACHE.clear()


def generate(prompt: str, videos: Video | Sequence[Video] | None = None, *, checkpoint: str | os.PathLike | None = None,
             pipeline: DivotPipeline | None = None, seed: int | None = None, output: str | os.PathLike | None = None,
             mode: str = "auto", **kw: Any) -> str | GeneratedVideo:
    """One call: with ``videos``, the text answer to ``prompt``; without, the generated video
    of ``prompt`` (also written to ``output`` if given). ``mode`` "text" / "video" overrides.
    ``pipeline`` is used as given; otherwise :func:`get_pipeline` loads (once) ``checkpoint``
    with the load options among ``kw`` (tokenizer, detokenizer, device, dtype, max_clips); the
    other keywords go to :meth:`DivotPipeline.answer` or :meth:`DivotPipeline.generate_video`."""
    if mode not in ("auto", "text", "video"):
        raise ValueError(f"mode must be 'auto', 'text' or 'video', got {mode!r}")
    load_kw = {k: kw.pop(k) for k in _LOAD_KEYS if k in kw}
    mode = mode if mode != "auto" else ("text" if as_video_list(videos) else "video")
    if pipeline is None:
        if checkpoint is None and mode == "video":
            checkpoint = find_checkpoint(candidates=GENERATION_CHECKPOINTS)
        pipeline = get_pipeline(checkpoint, **load_kw)
    elif checkpoint is not None or load_kw:
        raise ValueError("pass either pipeline= or checkpoint= / load options, not both")
    if mode == "text":
        if output is not None:
            raise ValueError("output= writes a generated video; mode 'text' returns a string")
        return pipeline.answer(prompt, videos, seed=seed, **kw)
    return pipeline.generate_video(prompt, videos=videos, seed=seed, output=output, **kw)
