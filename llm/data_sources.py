"""Raw Divot-LLM training samples: Shapes captioning / generation / QA, users' caption lists
and LLaVA-style conversations, and a deterministic mixture of them (DESIGN.md §4, §8).

Every source is a map-style torch ``Dataset`` whose item is a *sample*::

    {"task": str, "turns": list[Turn], "videos": list[VideoRef], "target_video": VideoRef | None}

``videos`` are the clips shown to the model, in the order their placeholders appear in the
turns; ``target_video`` is the clip a ``reply_video`` turn must generate. Pixels are not read
here: :class:`llm.features.ClipFeatures` turns refs into Divot tokens (from a cache or the
frozen tokenizer) when :class:`llm.collate.LLMCollator` builds the batch. A video longer than
2 s enters as consecutive 2-s clips (``divot.video_io.read_clips``, at most ``max_clips``),
each adding one to its turn's ``num_clips``; the count is read from the container's metadata
(``probe_video``) so that the prompt can be written before any pixel is decoded. An
unreadable video makes the item ``{"corrupt": path}`` (with a warning), which the collator
drops and counts, as ``divot.data.collate_videos`` does.

Axis glossary: none (no tensors here; refs and text only).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from torch.utils.data import Dataset

from divot.data import VideoTextDataset
from divot.shapes import SPLIT_SIZES, SPLITS, ShapesWorld
from divot.video_io import CLIP_FPS, CLIP_FRAMES, VideoReadError, probe_video
from llm.features import VideoRef
from llm.text_tokenizer import GENERATION_INSTRUCTION, Turn

logger = logging.getLogger(__name__)

DEFAULT_MAX_CLIPS = 4  # training; evaluation reads up to divot.video_io.MAX_QA_CLIPS
VIDEO_MARKER = "<video>"
CAPTION_PROMPTS = (
    "Describe the video.",
    "What happens in this video?",
    "Write a short caption for the video.",
    "Describe what you see in the clip.",
    "Summarize the video in one sentence.",
    "What is shown in this video?",
)
MC_LETTERS = "ABCDE"
MC_INSTRUCTION = "Answer with the text of the correct option."
_PROMPT_STREAM = 7  # a ShapesWorld rng stream of its own (the world uses 0, 1, 2)
_TIME_EPS = 1e-3  # as divot.video_io: a window starting within 1 ms of the end is no window


# ------------------------------------------------------------------ prompt formats
def format_multiple_choice(question: str, options: Sequence[str]) -> str:
    """The question, the options lettered ``A. …`` one per line, then the answer instruction.

    The one place this prompt is written: training and the EgoSchema evaluation share it."""
    if not 2 <= len(options) <= len(MC_LETTERS):
        raise ValueError(f"need 2 to {len(MC_LETTERS)} options, got {len(options)}")
    lines = [question.strip()] + [f"{MC_LETTERS[i]}. {opt}" for i, opt in enumerate(options)]
    return "\n".join(lines + [MC_INSTRUCTION])


def format_mc_answer(options: Sequence[str], answer: int) -> str:
    """The reply to :func:`format_multiple_choice`: the option's text, e.g. ``"red"``.

    Not ``"C. red"``: a reply that starts with the letter must find the option's line before it
    says the option, and the tiny LLM failed that lookup (greedy ``"E. two"`` with two = D, in
    most generate-mode answers, docs/RESULTS.md), so its two scoring modes disagreed. The letter
    stays in the prompt; :func:`eval.mc_core.parse_choice` still accepts a letter in a reply."""
    if not 0 <= answer < len(options):
        raise ValueError(f"answer index {answer} outside the {len(options)} options")
    return options[answer]


def make_sample(task: str, turns: Sequence[Turn], videos: Sequence[VideoRef] = (),
                target_video: VideoRef | None = None) -> dict[str, Any]:
    return {"task": task, "turns": list(turns), "videos": list(videos), "target_video": target_video}


def _corrupt(path: str, exc: Exception) -> dict[str, str]:
    reason = exc.reason if isinstance(exc, VideoReadError) else f"{type(exc).__name__}: {exc}"
    logger.warning("skipping unreadable video %s: %s", path, reason)
    return {"corrupt": path}


def count_clips(path: str | os.PathLike, max_clips: int | None = DEFAULT_MAX_CLIPS) -> int:
    """How many clips ``read_clips(path, max_clips)`` gives: one per started 2-s window,
    at most ``max_clips`` (from metadata; raises VideoReadError for an unreadable file)."""
    window = CLIP_FRAMES / CLIP_FPS
    n = max(1, math.ceil(probe_video(path).duration / window - _TIME_EPS))
    return n if max_clips is None else min(n, max_clips)


def file_clip_refs(path: str | os.PathLike, max_clips: int | None = DEFAULT_MAX_CLIPS) -> list[VideoRef]:
    n = count_clips(path, max_clips)
    return [VideoRef.file(path, k, n) for k in range(n)]


def _check_index(index: int, length: int) -> int:
    index = int(index) + (length if index < 0 else 0)
    if not 0 <= index < length:
        raise IndexError(f"index {index} outside a source of {length} items")
    return index


# ------------------------------------------------------------------ Shapes world
class _ShapesSource(Dataset):
    """Items of one ShapesWorld split; the clip is rendered later, from its ref."""

    def __init__(self, split: str = "train", size: int | None = None, length: int | None = None,
                 seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        self.split, self.size, self.seed = split, size, int(seed)
        self.length = int(length if length is not None else (SPLIT_SIZES[split] or 10**6))
        self.world = ShapesWorld(seed=self.seed)

    def __len__(self) -> int:
        return self.length

    def ref(self, index: int) -> VideoRef:
        return VideoRef.shapes_clip(self.seed, self.split, index, self.size)

    def _prompt_rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, SPLITS.index(self.split), index, _PROMPT_STREAM])

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._sample(_check_index(index, self.length))

    def _sample(self, index: int) -> dict[str, Any]:
        raise NotImplementedError


class ShapesCaptionSource(_ShapesSource):
    """video → caption ("caption"): a varied request to describe the clip, its caption as reply."""

    def _sample(self, index):
        prompt = CAPTION_PROMPTS[self._prompt_rng(index).integers(len(CAPTION_PROMPTS))]
        turn = Turn(prompt, num_clips=1, reply=self.world.caption(self.split, index))
        return make_sample("caption", [turn], [self.ref(index)])


class ShapesGenerationSource(_ShapesSource):
    """caption → video ("generate"): ``Generate a video of {caption}``, the clip as target."""

    def _sample(self, index):
        turn = Turn(GENERATION_INSTRUCTION.format(caption=self.world.caption(self.split, index)),
                    reply_video=True)
        return make_sample("generate", [turn], target_video=self.ref(index))


class ShapesQASource(_ShapesSource):
    """EgoSchema-form multiple choice ("qa") from ``ShapesWorld.question``."""

    def _sample(self, index):
        q = self.world.question(self.split, index)
        turn = Turn(format_multiple_choice(q["question"], q["options"]), num_clips=1,
                    reply=format_mc_answer(q["options"], q["answer"]))
        return make_sample("qa", [turn], [self.ref(index)])


# ------------------------------------------------------------------ users' files
class CaptionJsonlSource(Dataset):
    """A ``{"video", "caption"}`` jsonl (see :class:`divot.data.VideoTextDataset`).

    Item ``i`` is entry ``i // len(tasks)`` as task ``tasks[i % len(tasks)]``: "caption"
    shows all of the video's clips (≤ ``max_clips``), "generate" targets its first 2-s clip.
    Generation items are not probed here (no clip count is needed): an unreadable target is
    found, dropped and counted by the collator when it reads the pixels.
    """

    TASKS = ("caption", "generate")

    def __init__(self, jsonl: str | os.PathLike, video_root: str | os.PathLike | None = None,
                 tasks: Sequence[str] = ("caption",), max_clips: int = DEFAULT_MAX_CLIPS, seed: int = 0):
        unknown = [t for t in tasks if t not in self.TASKS]
        if unknown or not tasks:
            raise ValueError(f"tasks must be a non-empty subset of {self.TASKS}, got {list(tasks)}")
        # Reused for its jsonl parsing and path resolution; it decodes nothing here.
        self.captions = VideoTextDataset(jsonl, video_root)
        self.tasks, self.max_clips, self.seed = tuple(tasks), int(max_clips), int(seed)

    def __len__(self) -> int:
        return len(self.captions) * len(self.tasks)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = _check_index(index, len(self))
        entry, task = divmod(index, len(self.tasks))
        path, caption = self.captions.video_path(entry), self.captions.entries[entry][1]
        if self.tasks[task] == "generate":
            turn = Turn(GENERATION_INSTRUCTION.format(caption=caption), reply_video=True)
            return make_sample("generate", [turn], target_video=VideoRef.file(path, 0, 1))
        try:
            refs = file_clip_refs(path, self.max_clips)
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop training
            return _corrupt(path, exc)
        prompt = CAPTION_PROMPTS[np.random.default_rng([self.seed, entry]).integers(len(CAPTION_PROMPTS))]
        return make_sample("caption", [Turn(prompt, num_clips=len(refs), reply=caption)], refs)


_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def _parse_conversation(record: Any, where: str) -> tuple[list[str], list[tuple[str, str, list[int]]]]:
    """(videos, [(user text without markers, reply, indices of the videos shown)])."""
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        raise ValueError(f"{where}: expected an object with a 'conversations' list")
    videos = record.get("video") or []
    videos = [videos] if isinstance(videos, str) else videos
    if not isinstance(videos, list) or not all(isinstance(v, str) and v for v in videos):
        raise ValueError(f"{where}: 'video' must be a path or a list of paths")
    messages = record["conversations"]
    if not messages or len(messages) % 2:
        raise ValueError(f"{where}: needs user/assistant message pairs, got {len(messages)} messages")
    turns, shown = [], 0
    for m, (user, reply) in enumerate(zip(messages[::2], messages[1::2])):
        roles = [_ROLES.get(msg.get("from")) if isinstance(msg, dict) else None for msg in (user, reply)]
        if roles != ["user", "assistant"] or not all(isinstance(x.get("value"), str) for x in (user, reply)):
            raise ValueError(f"{where}: messages {2 * m}, {2 * m + 1} must be a human then a gpt "
                             f"message with string 'value's")
        if VIDEO_MARKER in reply["value"]:
            raise ValueError(f"{where}: a gpt reply holds a {VIDEO_MARKER} marker")
        markers = user["value"].count(VIDEO_MARKER)
        text = re.sub(r"\s*" + re.escape(VIDEO_MARKER) + r"\s*", " ", user["value"]).strip()
        turns.append((text, reply["value"], list(range(shown, shown + markers))))
        shown += markers
    if shown != len(videos):
        what = "no <video> marker" if shown == 0 else f"{shown} <video> marker(s)"
        raise ValueError(f"{where}: {what} for {len(videos)} video(s); each video needs exactly one marker")
    return videos, turns


class ConversationSource(Dataset):
    """LLaVA-style ``[{"video": "a.mp4", "conversations": [{"from": "human", "value":
    "<video>\\nWhat …?"}, {"from": "gpt", "value": "…"}, …]}]`` → multi-turn samples.

    ``<video>`` markers (one per video; "video" may be a list) are removed from the text and
    the clips of each video go to the turn where its marker appeared. Relative video paths
    resolve against ``video_root`` (default: the json's folder). Malformed records raise at
    construction, naming the record.
    """

    def __init__(self, json_path: str | os.PathLike, video_root: str | os.PathLike | None = None,
                 max_clips: int = DEFAULT_MAX_CLIPS, task: str = "chat"):
        json_path = Path(json_path)
        if not json_path.is_file():
            raise FileNotFoundError(f"conversation file '{json_path}' does not exist")
        try:
            records = json.loads(json_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{json_path}: not valid JSON ({exc.msg})") from exc
        if not isinstance(records, list) or not records:
            raise ValueError(f"{json_path}: expected a non-empty JSON list of conversations")
        self.root = Path(video_root) if video_root is not None else json_path.parent
        self.records = [_parse_conversation(r, f"{json_path}, record {i}") for i, r in enumerate(records)]
        self.max_clips, self.task = int(max_clips), task

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        videos, turns = self.records[_check_index(index, len(self))]
        clips: list[list[VideoRef]] = []
        for video in videos:
            path = str(video if Path(video).is_absolute() else self.root / video)
            try:
                clips.append(file_clip_refs(path, self.max_clips))
            except Exception as exc:  # noqa: BLE001 - one bad file must not stop training
                return _corrupt(path, exc)
        out_turns = [Turn(text, num_clips=sum(len(clips[v]) for v in shown), reply=reply)
                     for text, reply, shown in turns]
        # Placeholders appear turn by turn, videos in marker order: the refs' order is the same.
        return make_sample(self.task, out_turns, [ref for refs in clips for ref in refs])


# ------------------------------------------------------------------ mixture
class MixtureSource(Dataset):
    """Item ``i`` comes from a source drawn with probability ∝ ``ratios`` and a uniform index
    into it, both from ``rng(seed, i)`` alone: any item can be recomputed in any order, so a
    resumed run continues by index (DESIGN.md §4: e.g. caption 1.3, generate 1.0)."""

    def __init__(self, sources: Mapping[str, Dataset], ratios: Mapping[str, float], length: int,
                 seed: int = 0):
        missing, unexpected = sorted(set(sources) - set(ratios)), sorted(set(ratios) - set(sources))
        if missing or unexpected:
            raise ValueError(f"ratios must name every source: missing {missing}, unexpected {unexpected}")
        weights = np.array([float(ratios[name]) for name in sources])
        if not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
            raise ValueError(f"ratios must be finite, non-negative and not all zero: {dict(ratios)}")
        empty = [name for name, src in sources.items() if len(src) == 0]
        if empty or length < 1:
            raise ValueError(f"need length >= 1 and non-empty sources (empty: {empty}, length {length})")
        self.sources, self.names = dict(sources), list(sources)
        self.probs, self.length, self.seed = weights / weights.sum(), int(length), int(seed)

    def __len__(self) -> int:
        return self.length

    def locate(self, index: int) -> tuple[str, int]:
        """(source name, index inside it) of mixture item ``index``."""
        rng = np.random.default_rng([self.seed, _check_index(index, self.length)])
        name = self.names[rng.choice(len(self.names), p=self.probs)]
        return name, int(rng.integers(len(self.sources[name])))

    def __getitem__(self, index: int) -> dict[str, Any]:
        name, inner = self.locate(index)
        return self.sources[name][inner]


def iter_video_refs(source: Dataset) -> Iterator[VideoRef]:
    """Every clip ref of every item (inputs, then target), unreadable items skipped."""
    for i in range(len(source)):
        sample = source[i]
        if "corrupt" in sample:
            continue
        yield from sample["videos"]
        if sample["target_video"] is not None:
            yield sample["target_video"]
