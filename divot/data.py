"""Torch datasets over real video files (WebVid-style caption lists).

A caption list is a jsonl file, one ``{"video": path, "caption": text}`` per
line; relative paths are resolved against ``video_root``. Each item is one
2-second clip (16 frames at 8 fps, DESIGN §2) resized and center-cropped to a
square. Web-scale video sets always contain some broken files, so an
unreadable video never raises during training: the item becomes a
``{"corrupt": path}`` marker, which ``collate_videos`` drops and counts.

Axis glossary: b = batch, f = frames, c = channels (RGB), s = side (h = w).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from divot.video_io import CLIP_FPS, CLIP_FRAMES, VideoReadError, probe_video, read_clip, to_tensor

logger = logging.getLogger(__name__)


def _load_jsonl(path: Path) -> list[tuple[str, str]]:
    """(video, caption) pairs from a jsonl file; errors name file and line."""
    if not path.is_file():
        raise FileNotFoundError(f"caption list '{path}' does not exist")
    entries: list[tuple[str, str]] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            for key in ("video", "caption"):
                if not isinstance(record.get(key), str) or not record[key]:
                    raise ValueError(f"{where}: needs a non-empty string '{key}'")
            entries.append((record["video"], record["caption"]))
    if not entries:
        raise ValueError(f"caption list '{path}' has no entries")
    return entries


class VideoTextDataset(Dataset):
    """WebVid-style (video clip, caption) pairs.

    Items are ``{"video": float (f, c, s, s) in [-1, 1], "caption": str,
    "path": str}``, or ``{"corrupt": path}`` when the file cannot be read (a
    warning names it). With ``random_start`` the clip starts at a random
    time in videos longer than one window; the draw depends only on (seed,
    epoch, index), so runs repeat exactly. Call ``set_epoch`` each epoch; with
    persistent DataLoader workers the workers keep their own copy, so recreate
    the loader (or the workers) to see the new epoch.
    """

    def __init__(
        self,
        jsonl_path: str | os.PathLike,
        video_root: str | os.PathLike | None = None,
        size: int = 256,
        num_frames: int = CLIP_FRAMES,
        fps: float = CLIP_FPS,
        random_start: bool = False,
        seed: int = 0,
    ):
        self.jsonl_path = Path(jsonl_path)
        self.entries = _load_jsonl(self.jsonl_path)
        # relative paths default to the jsonl's own folder
        self.video_root = Path(video_root) if video_root is not None else self.jsonl_path.parent
        self.size, self.num_frames, self.fps = size, num_frames, fps
        self.random_start, self.seed, self.epoch = random_start, seed, 0

    def __len__(self) -> int:
        return len(self.entries)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def video_path(self, index: int) -> str:
        video = Path(self.entries[index][0])
        return str(video if video.is_absolute() else self.video_root / video)

    def _start(self, index: int, path: str) -> float:
        """Clip start (s): 0, or uniform over the video's full windows."""
        if not self.random_start:
            return 0.0
        slack = probe_video(path).duration - self.num_frames / self.fps
        if slack <= 0:
            return 0.0
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return float(rng.uniform(0.0, slack))

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.video_path(index)
        try:
            frames = read_clip(path, self._start(index, path), self.num_frames, self.fps, self.size)
        except VideoReadError as exc:
            logger.warning("skipping unreadable video %s: %s", path, exc.reason)
            return {"corrupt": path}
        except Exception:  # noqa: BLE001 - a training run must outlive one odd file
            logger.warning("skipping video %s after an unexpected error", path, exc_info=True)
            return {"corrupt": path}
        return {"video": to_tensor(frames), "caption": self.entries[index][1], "path": path}


def collate_videos(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack readable items; drop and count ``{"corrupt": path}`` markers.

    Returns ``{"video": (b, f, c, s, s) or None, "caption": [...], "path":
    [...], "num_corrupt": int, "corrupt_paths": [...]}``; "video" is None when
    every item was corrupt, so the training loop can skip the step.
    """
    good = [item for item in batch if "corrupt" not in item]
    corrupt_paths = [item["corrupt"] for item in batch if "corrupt" in item]
    return {
        "video": torch.stack([item["video"] for item in good]) if good else None,
        "caption": [item["caption"] for item in good],
        "path": [item.get("path", "") for item in good],
        "num_corrupt": len(corrupt_paths),
        "corrupt_paths": corrupt_paths,
    }
