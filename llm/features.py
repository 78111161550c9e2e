"""Divot tokens of training clips: computed by the frozen tokenizer or read from a disk cache.

The Divot tokenizer is frozen while the LLM trains (DESIGN.md §4), so a clip's 64 tokens
never change and can be computed once. A :class:`VideoRef` names one 2-second clip (a window
of a video file, or a Shapes world item) and a stable cache key; :class:`ClipFeatures` turns
a list of refs into a ``(n, num_tokens, token_dim)`` tensor, looking each key up in a
:class:`FeatureCache` first and running ``tokenizer.encode`` under ``torch.no_grad`` for the
rest.

Cache layout (one directory): ``index.json`` (token shape, frame size, the list of shards)
and ``shard-NNNNN.safetensors`` files, each one tensor ``tokens`` (rows, num_tokens,
token_dim) whose safetensors header metadata lists the rows' keys. A shard is written to a
temporary name and renamed, then the index is rewritten the same way, so a killed writer
leaves every listed shard whole and a rerun skips the keys already stored. Shards are opened
lazily (memory-mapped, at most ``max_open_shards`` at a time) and read row by row.
``probe.safetensors`` holds the tokens of one fixed clip from the tokenizer that wrote the
cache, so a cache is never silently mixed with a different (e.g. retrained) tokenizer.
One writer at a time: concurrent writers would overwrite each other's index.

Axis glossary: n = clips (refs), f = frames, c = RGB channels, s = frame side,
t = tokens per clip, d = token width.
"""
from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from divot.shapes import ShapesWorld, render
from divot.tokenizer import DivotTokenizer
from divot.video_io import VideoReadError, read_clips, resize_center_crop, to_tensor

logger = logging.getLogger(__name__)

CACHE_FORMAT = "divot-clip-features"
INDEX_NAME = "index.json"
PROBE_NAME = "probe.safetensors"
# Relative error above which a tokenizer does not match the cache's (bf16 vs fp32 ≈ 1e-2).
PROBE_TOLERANCE = 0.05


class FeatureCacheMiss(LookupError):
    """Keys absent from a feature cache that has no tokenizer to compute them."""


@dataclass(frozen=True)
class VideoRef:
    """One 2-second clip: where its pixels come from, and its cache key.

    A file clip is clip ``clip`` of ``divot.video_io.read_clips(path, max_clips=num_clips)``
    (``num_clips`` is the number of clips the video is cut into, so it fixes which windows
    they are). A Shapes clip is item ``shapes = (seed, split, index)`` of
    :class:`divot.shapes.ShapesWorld`, rendered at ``size`` (None: the tokenizer's frame size).
    """
    key: str
    path: str | None = None
    clip: int = 0
    num_clips: int = 1
    shapes: tuple[int, str, int] | None = None
    size: int | None = None

    def __post_init__(self):
        if (self.path is None) == (self.shapes is None):
            raise ValueError(f"VideoRef {self.key!r} needs exactly one of path / shapes")
        if not 0 <= self.clip < self.num_clips:
            raise ValueError(f"VideoRef {self.key!r}: clip {self.clip} outside 0..{self.num_clips - 1}")

    @classmethod
    def file(cls, path: str | os.PathLike, clip: int = 0, num_clips: int = 1) -> "VideoRef":
        path = os.path.abspath(os.fspath(path))
        return cls(key=f"file:{path}#{clip}/{num_clips}", path=path, clip=clip, num_clips=num_clips)

    @classmethod
    def shapes_clip(cls, seed: int, split: str, index: int, size: int | None = None) -> "VideoRef":
        key = f"shapes:{seed}/{split}/{index}" + (f"@{size}" if size else "")
        return cls(key=key, shapes=(int(seed), split, int(index)), size=size)


def read_ref_pixels(refs: Sequence[VideoRef], frame_size: int) -> list[np.ndarray]:
    """uint8 (f, s, s, c) per ref. Each video file is decoded once for all its refs.

    Any failure to decode a file (or fewer clips than the ref expects) raises
    :class:`divot.video_io.VideoReadError` naming the file.
    """
    out: list[np.ndarray | None] = [None] * len(refs)
    by_video: dict[tuple[str, int], list[int]] = defaultdict(list)
    worlds: dict[int, ShapesWorld] = {}
    for i, ref in enumerate(refs):
        if ref.path is not None:
            by_video[(ref.path, ref.num_clips)].append(i)
            continue
        seed, split, index = ref.shapes
        world = worlds.setdefault(seed, ShapesWorld(seed=seed))
        frames = render(world.clip(split, index), ref.size or frame_size)
        out[i] = frames if frames.shape[1] == frame_size else resize_center_crop(frames, frame_size)
    for (path, num_clips), members in by_video.items():
        try:
            clips = read_clips(path, max_clips=num_clips, size=frame_size)
        except VideoReadError:
            raise
        except Exception as exc:  # noqa: BLE001 - any decoder failure means "unreadable file"
            raise VideoReadError(path, f"{type(exc).__name__}: {exc}") from exc
        for i in members:
            if refs[i].clip >= len(clips):
                raise VideoReadError(path, f"decoded {len(clips)} clips, expected {num_clips}")
            out[i] = clips[refs[i].clip]
    return out


class FeatureCache:
    """On-disk key → (t, d) token store; see the module docstring for the layout."""

    def __init__(self, directory: str | os.PathLike, max_open_shards: int = 4, shard_size: int = 1024):
        self.directory = Path(directory)
        self.max_open_shards, self.shard_size = max_open_shards, shard_size
        self._index: dict | None = None
        self._rows: dict[str, tuple[int, int]] | None = None
        self._open: OrderedDict[int, object] = OrderedDict()
        self._pending: dict[str, torch.Tensor] = {}

    def exists(self) -> bool:
        return (self.directory / INDEX_NAME).is_file()

    @property
    def meta(self) -> dict:
        """``num_tokens``, ``token_dim``, ``frame_size`` and ``shards`` of an existing cache."""
        if self._index is None:
            path = self.directory / INDEX_NAME
            if not path.is_file():
                raise FileNotFoundError(f"no feature cache at {self.directory} (missing {INDEX_NAME})")
            index = json.loads(path.read_text())
            if index.get("format") != CACHE_FORMAT:
                raise ValueError(f"{path} is not a Divot clip-feature index")
            self._index = index
        return self._index

    def create(self, num_tokens: int, token_dim: int, frame_size: int, probe: torch.Tensor) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        _atomic_save({"tokens": probe}, self.directory / PROBE_NAME)
        self._index = {"format": CACHE_FORMAT, "version": 1, "num_tokens": num_tokens,
                       "token_dim": token_dim, "frame_size": frame_size, "shards": []}
        self._write_index()

    def probe(self) -> torch.Tensor | None:
        path = self.directory / PROBE_NAME
        return load_file(str(path))["tokens"] if path.is_file() else None

    def _key_rows(self) -> dict[str, tuple[int, int]]:
        if self._rows is None:
            self._rows = {}
            for s, name in enumerate(self.meta["shards"]):
                with safe_open(str(self.directory / name), "pt") as f:
                    keys = json.loads(f.metadata()["keys"])
                self._rows.update({k: (s, r) for r, k in enumerate(keys)})
            logger.info("feature cache %s: %d clips in %d shards", self.directory, len(self._rows),
                        len(self.meta["shards"]))
        return self._rows

    def __contains__(self, key: str) -> bool:
        return key in self._pending or key in self._key_rows()

    def __len__(self) -> int:
        return len(self._key_rows()) + len(self._pending)

    def _shard(self, s: int):
        if s in self._open:
            self._open.move_to_end(s)
        else:
            if len(self._open) >= self.max_open_shards:
                self._open.popitem(last=False)  # least recently used; its mmap closes with it
            self._open[s] = safe_open(str(self.directory / self.meta["shards"][s]), "pt")
        return self._open[s]

    def get(self, key: str) -> torch.Tensor:
        if key in self._pending:
            return self._pending[key]
        s, r = self._key_rows()[key]
        return self._shard(s).get_slice("tokens")[r:r + 1][0]

    def add(self, key: str, tokens: torch.Tensor) -> None:
        if key not in self:
            self._pending[key] = tokens.detach().float().cpu().contiguous()
        if len(self._pending) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write pending tokens as one new shard, then list it in the index."""
        if not self._pending:
            return
        keys = list(self._pending)
        shards = self.meta["shards"]
        name = f"shard-{len(shards):05d}.safetensors"
        _atomic_save({"tokens": torch.stack([self._pending[k] for k in keys])}, self.directory / name,
                     metadata={"keys": json.dumps(keys)})
        shards.append(name)
        self._write_index()
        rows = self._key_rows()
        rows.update({k: (len(shards) - 1, r) for r, k in enumerate(keys)})
        self._pending.clear()
        logger.info("feature cache %s: wrote %s (%d clips)", self.directory, name, len(keys))

    def _write_index(self) -> None:
        tmp = self.directory / (INDEX_NAME + ".tmp")
        tmp.write_text(json.dumps(self._index, indent=1) + "\n")
        os.replace(tmp, self.directory / INDEX_NAME)


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def tokenizer_frame_size(tokenizer_dir: str | os.PathLike) -> int:
    """The frame side a trained tokenizer saw: its run's de-tokenizer ``frame_size`` when the
    run directory (``…/tokenizer`` beside ``…/detokenizer``) has one, else the ViT's input size."""
    tokenizer_dir = Path(tokenizer_dir)
    detok = tokenizer_dir.parent / "detokenizer" / "config.json"
    if detok.is_file():
        return int(json.loads(detok.read_text())["frame_size"])
    return int(json.loads((tokenizer_dir / "config.json").read_text())["vit"]["img_size"])


class ClipFeatures:
    """refs → (n, t, d) Divot tokens: from the cache where present, else from the tokenizer.

    ``tokenizer`` is frozen: it is put in eval mode, moved to ``device`` and run under
    ``torch.no_grad`` in batches of ``batch_size``; its dtype is kept (pass a bf16 tokenizer
    for bf16 features). Returned tensors are float32 on the CPU. ``frame_size`` None takes the
    cache's frame size, else the ViT input size (pass :func:`tokenizer_frame_size` of a run
    directory to match training). With ``write`` computed tokens are added to the cache
    (created if missing); call :meth:`flush` at the end. Without a tokenizer every key must be
    cached, else :class:`FeatureCacheMiss`.
    """

    def __init__(self, tokenizer=None, cache_dir: str | os.PathLike | None = None,
                 device: str | torch.device = "cpu", batch_size: int = 16,
                 frame_size: int | None = None, write: bool = False, shard_size: int = 1024):
        if tokenizer is None and cache_dir is None:
            raise ValueError("ClipFeatures needs a tokenizer, a cache_dir, or both")
        if write and (tokenizer is None or cache_dir is None):
            raise ValueError("write=True needs both a tokenizer and a cache_dir")
        self.device, self.batch_size, self.write = torch.device(device), int(batch_size), write
        self.tokenizer = tokenizer.eval().to(self.device) if tokenizer is not None else None
        self.cache = FeatureCache(cache_dir, shard_size=shard_size) if cache_dir is not None else None
        if self.cache is not None and not self.cache.exists() and not write:
            if tokenizer is None:
                raise FileNotFoundError(f"no feature cache at {cache_dir} and no tokenizer to compute features")
            logger.warning("no feature cache at %s: computing every clip with the tokenizer", cache_dir)
            self.cache = None
        self.frame_size = self._resolve_frame_size(frame_size)
        if self.cache is not None:
            self._check_cache()

    # ------------------------------------------------------------------ set-up
    def _resolve_frame_size(self, frame_size: int | None) -> int:
        cached = self.cache.meta["frame_size"] if self.cache is not None and self.cache.exists() else None
        if frame_size is not None and cached is not None and frame_size != cached:
            raise ValueError(f"frame_size {frame_size} differs from the cache's {cached} ({self.cache.directory})")
        if frame_size is not None or cached is not None:
            return int(frame_size or cached)
        return int(self.tokenizer.config.vit.img_size)

    @property
    def num_tokens(self) -> int:
        return self.tokenizer.config.num_tokens if self.tokenizer is not None else self.cache.meta["num_tokens"]

    @property
    def token_dim(self) -> int:
        return self.tokenizer.config.token_dim if self.tokenizer is not None else self.cache.meta["token_dim"]

    def _probe_tokens(self) -> torch.Tensor:
        """Tokens of one fixed Shapes clip: the tokenizer's fingerprint."""
        return self._encode([VideoRef.shapes_clip(0, "val", 0)])[0]

    def _check_cache(self) -> None:
        if not self.cache.exists():  # write=True: a new cache
            self.cache.create(self.num_tokens, self.token_dim, self.frame_size, self._probe_tokens())
            return
        meta = self.cache.meta
        if self.tokenizer is None:
            return
        shape = (self.num_tokens, self.token_dim)
        if (meta["num_tokens"], meta["token_dim"]) != shape:
            raise ValueError(f"cache {self.cache.directory} holds {meta['num_tokens']}×{meta['token_dim']} "
                             f"tokens but the tokenizer makes {shape[0]}×{shape[1]}")
        stored = self.cache.probe()
        if stored is not None:
            err = ((self._probe_tokens() - stored).norm() / stored.norm().clamp_min(1e-8)).item()
            if err > PROBE_TOLERANCE:
                raise ValueError(f"cache {self.cache.directory} was written by a different tokenizer "
                                 f"(probe clip differs by {err:.3f} relative); use a fresh cache directory")

    # ------------------------------------------------------------------ lookup
    def __call__(self, refs: Sequence[VideoRef]) -> torch.Tensor:
        refs = list(refs)
        if not refs:
            return torch.zeros(0, self.num_tokens, self.token_dim)
        found: dict[str, torch.Tensor] = {}
        missing: dict[str, VideoRef] = {}
        for ref in refs:
            if ref.key in found or ref.key in missing:
                continue
            if self.cache is not None and ref.key in self.cache:
                found[ref.key] = self.cache.get(ref.key)
            else:
                missing[ref.key] = ref
        if missing and self.tokenizer is None:
            keys = list(missing)
            raise FeatureCacheMiss(f"{len(keys)} clip(s) missing from feature cache {self.cache.directory} "
                                   f"and no tokenizer to compute them, e.g. {keys[:3]}; "
                                   f"fill it with scripts/cache_features.py")
        if missing:
            todo = list(missing.values())
            for ref, tokens in zip(todo, self._encode(todo)):
                found[ref.key] = tokens
                if self.write:
                    self.cache.add(ref.key, tokens)
        return torch.stack([found[ref.key] for ref in refs]).float()

    @torch.no_grad()
    def _encode(self, refs: list[VideoRef]) -> torch.Tensor:
        dtype = next(self.tokenizer.parameters()).dtype
        out = []
        for start in range(0, len(refs), self.batch_size):
            pixels = read_ref_pixels(refs[start:start + self.batch_size], self.frame_size)
            video = torch.stack([to_tensor(p) for p in pixels])  # (n, f, c, s, s)
            tokens = self.tokenizer.encode(video.to(self.device, dtype))
            out.append(tokens.float().cpu())
        return torch.cat(out)

    def flush(self) -> None:
        if self.cache is not None:
            self.cache.flush()


def load_clip_features(tokenizer_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                       device: str | torch.device = "cpu", **kwargs) -> ClipFeatures:
    """:class:`ClipFeatures` from a trained tokenizer directory (``runs/tokenizer/tokenizer``)
    and/or a cache, at the frame size the tokenizer was trained on."""
    tokenizer = None
    if tokenizer_dir is not None:
        tokenizer = DivotTokenizer.from_pretrained(tokenizer_dir).requires_grad_(False)
        kwargs.setdefault("frame_size", tokenizer_frame_size(tokenizer_dir))
    return ClipFeatures(tokenizer, cache_dir, device, **kwargs)
