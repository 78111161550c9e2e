"""The Shapes world: a procedural video-language world shipped as default data.

Clips are 16 frames (8 fps, 2 s) of one or two coloured shapes moving on a
black 64x64 canvas (DESIGN.md section 8). Everything is generated from a seed,
so training, comprehension and generation can be scored exactly and offline:
captions and EgoSchema-style questions are derived from the same scene
description that is rendered, and :mod:`divot.probe` reads the attributes back
out of any clip. Geometry lives in 64-px canvas units; rendering at another
size scales it, so a 32-px render is the same scene downscaled.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

CANVAS = 64.0
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 230),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 200),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down", "still")
HELDOUT_PAIRS = frozenset({("green", "triangle"), ("yellow", "square"), ("purple", "circle")})
ALL_PAIRS = tuple((c, s) for c in COLORS for s in SHAPES)
TRAIN_PAIRS = tuple(p for p in ALL_PAIRS if p not in HELDOUT_PAIRS)
SPLITS = ("train", "val", "test")
SPLIT_SIZES: dict[str, int | None] = {"train": None, "val": 256, "test": 512}

SIZE_RANGE = (6.0, 10.0)
SPEED_RANGE = (1.5, 2.5)
MIN_GAP = 3.0
TWO_OBJECT_PROB = 0.35
# Evaluation splits force a held-out pair this often, so that ~200 test clips
# hold well over 40 held-out examples (uniform draws alone give ~1 in 5).
HELDOUT_FORCE_PROB = 0.3
_MAX_TRIES = 1000
# Image y grows downwards, so "up" is negative y.
_UNIT = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}


@dataclass(frozen=True)
class ShapeObject:
    """One object; ``x, y`` is its centre at frame 0, ``size`` its half-extent."""

    shape: str
    color: str
    direction: str
    x: float
    y: float
    size: float
    speed: float

    def position(self, t):
        """Centre at frame ``t`` (a number or a numpy array of frame indices)."""
        ux, uy = _UNIT[self.direction]
        return self.x + ux * self.speed * t, self.y + uy * self.speed * t


@dataclass(frozen=True)
class ShapesClip:
    objects: tuple[ShapeObject, ...]
    num_frames: int = 16

    @property
    def heldout(self) -> bool:
        return any((o.color, o.shape) in HELDOUT_PAIRS for o in self.objects)


# ----------------------------------------------------------------- sampling
def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def _sample_pairs(rng: np.random.Generator, split: str, n: int) -> list[tuple[str, str]]:
    """(colour, shape) pairs with distinct colours, obeying the split's rules."""
    pool = TRAIN_PAIRS if split == "train" else ALL_PAIRS
    pairs: list[tuple[str, str]] = []
    if split != "train" and rng.random() < HELDOUT_FORCE_PROB:
        held = sorted(HELDOUT_PAIRS)
        pairs.append(held[rng.integers(len(held))])
    while len(pairs) < n:
        pair = pool[rng.integers(len(pool))]
        if all(pair[0] != p[0] for p in pairs):
            pairs.append(pair)
    order = rng.permutation(n)
    return [pairs[i] for i in order]


def _sample_object(rng: np.random.Generator, color: str, shape: str, num_frames: int) -> ShapeObject:
    direction = DIRECTIONS[rng.integers(len(DIRECTIONS))]
    size = float(rng.uniform(*SIZE_RANGE))
    speed = 0.0 if direction == "still" else float(rng.uniform(*SPEED_RANGE))
    steps = max(num_frames - 1, 1)
    room = CANVAS - 2 * size
    if speed * steps > room:
        # Only long clips get here; staying on the canvas wins over the speed range.
        speed = room / steps
        logger.debug("%d-frame clip: speed capped at %.2f px/frame", num_frames, speed)
    travel = speed * steps
    ux, uy = _UNIT[direction]
    lo_x, hi_x = size + max(0.0, -ux * travel), CANVAS - size - max(0.0, ux * travel)
    lo_y, hi_y = size + max(0.0, -uy * travel), CANVAS - size - max(0.0, uy * travel)
    # A capped speed uses the whole room: rounding may leave hi a hair below lo.
    hi_x, hi_y = max(hi_x, lo_x), max(hi_y, lo_y)
    return ShapeObject(shape, color, direction, float(rng.uniform(lo_x, hi_x)),
                       float(rng.uniform(lo_y, hi_y)), size, speed)


def _separated(a: ShapeObject, b: ShapeObject, num_frames: int) -> bool:
    """True if the two bounding boxes keep >= MIN_GAP apart on some axis every frame."""
    t = np.arange(num_frames, dtype=np.float64)
    ax, ay = a.position(t)
    bx, by = b.position(t)
    reach = a.size + b.size + MIN_GAP
    return bool(np.all((np.abs(ax - bx) >= reach) | (np.abs(ay - by) >= reach)))


def sample_clip(rng: np.random.Generator, split: str, num_objects: int | None = None,
                num_frames: int = 16) -> ShapesClip:
    """Draw one clip for ``split`` ("train" never holds a HELDOUT_PAIRS pair)."""
    _check_split(split)
    if num_objects is None:
        num_objects = 2 if rng.random() < TWO_OBJECT_PROB else 1
    if not 1 <= num_objects <= len(COLORS):
        raise ValueError(f"num_objects must be in 1..{len(COLORS)}, got {num_objects}")
    pairs = _sample_pairs(rng, split, num_objects)
    for _ in range(_MAX_TRIES):
        objects = [_sample_object(rng, c, s, num_frames) for c, s in pairs]
        if all(_separated(a, b, num_frames)
               for i, a in enumerate(objects) for b in objects[i + 1:]):
            return ShapesClip(tuple(objects), num_frames)
    raise RuntimeError(f"could not place {num_objects} non-overlapping objects")


# ---------------------------------------------------------------- rendering
def signed_distance(shape: str, dx: np.ndarray, dy: np.ndarray, size: float) -> np.ndarray:
    """Signed distance (negative inside) from offsets to the shape's centre."""
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - size
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - size
    if shape == "triangle":
        # Apex (0, -size), base corners (+-size, size); slanted edges have
        # outward normals (+-2, -1)/sqrt(5). Max of half-planes is exact inside.
        slant = (2.0 * np.abs(dx) - (dy + size)) / math.sqrt(5.0)
        return np.maximum(dy - size, slant)
    raise ValueError(f"unknown shape {shape!r}")


def render(clip: ShapesClip, size: int = 64) -> np.ndarray:
    """Render ``clip`` to uint8 (frames, size, size, 3), black background."""
    scale = size / CANVAS
    centres = (np.arange(size, dtype=np.float32) + 0.5) / scale
    t = np.arange(clip.num_frames, dtype=np.float32)
    cover = np.zeros((clip.num_frames, size, size, max(len(clip.objects), 1)), np.float32)
    for k, obj in enumerate(clip.objects):
        cx, cy = obj.position(t)
        dx = centres[None, None, :] - np.asarray(cx, np.float32)[:, None, None]
        dy = centres[None, :, None] - np.asarray(cy, np.float32)[:, None, None]
        # Coverage from the distance in pixels: a cheap one-pixel anti-aliasing
        # that keeps small (32-px) shapes faithful to their geometry.
        sd = signed_distance(obj.shape, dx, dy, obj.size)
        cover[..., k] = np.minimum(np.maximum(0.5 - sd * scale, 0.0), 1.0)
    palette = np.array([COLORS[o.color] for o in clip.objects] or [(0, 0, 0)], np.float32)
    # Objects never overlap (MIN_GAP), so colours simply add up.
    frames = cover @ palette + 0.5
    return np.minimum(frames, 255.0).astype(np.uint8)


# ----------------------------------------------------------------- captions
_MOVE_VERBS = ("moves", "slides", "drifts", "is moving", "travels", "glides")
_DIR_PHRASES = {
    "left": ("to the left", "left", "leftward"),
    "right": ("to the right", "right", "rightward"),
    "up": ("up", "upward"),
    "down": ("down", "downward"),
}
_STILL_PHRASES = ("stays still", "does not move", "stays in place", "remains still",
                  "sits still", "is not moving")
_CANONICAL_DIR = {"left": "moves to the left", "right": "moves to the right",
                  "up": "moves up", "down": "moves down", "still": "stays still"}


def _pick(rng: np.random.Generator, options):
    return options[rng.integers(len(options))]


def _object_phrase(obj: ShapeObject, rng: np.random.Generator | None) -> str:
    if rng is None:
        motion = _CANONICAL_DIR[obj.direction]
    elif obj.direction == "still":
        motion = _pick(rng, _STILL_PHRASES)
    else:
        motion = f"{_pick(rng, _MOVE_VERBS)} {_pick(rng, _DIR_PHRASES[obj.direction])}"
    return f"a {obj.color} {obj.shape} {motion}"


def caption(clip: ShapesClip, rng: np.random.Generator) -> str:
    """A randomly phrased caption, e.g. "a red circle slides left and a ..."."""
    return " and ".join(_object_phrase(o, rng) for o in clip.objects)


def canonical_caption(clip: ShapesClip) -> str:
    """The one fixed phrasing (deterministic), used for prompts."""
    return " and ".join(_object_phrase(o, None) for o in clip.objects)


# ---------------------------------------------------------------- questions
QUESTION_KINDS = ("color_by_motion", "direction", "shape_by_color", "count", "moves_or_still")
DIRECTION_ANSWERS = {"left": "to the left", "right": "to the right", "up": "up",
                     "down": "down", "still": "it stays still"}
COUNT_WORDS = ("one", "two", "three", "four", "five")
_SHAPE_DISTRACTORS = ("star", "hexagon", "diamond", "heart", "cross")
_CHANGE_DISTRACTORS = ("it grows larger", "it shrinks", "it changes colour",
                       "it disappears", "it splits in two", "it spins around")


def _ask_color_by_motion(clip, rng):
    counts = {d: sum(o.direction == d for o in clip.objects) for d in DIRECTIONS}
    unique = [o for o in clip.objects if counts[o.direction] == 1]
    if not unique:
        return None
    obj = _pick(rng, unique)
    motion = _CANONICAL_DIR[obj.direction]
    wrong = [c for c in COLORS if c != obj.color]
    options = [obj.color] + [wrong[i] for i in rng.choice(len(wrong), 4, replace=False)]
    return f"What colour is the shape that {motion}?", options


def _ask_direction(clip, rng):
    obj = _pick(rng, clip.objects)
    options = [DIRECTION_ANSWERS[obj.direction]]
    options += [DIRECTION_ANSWERS[d] for d in DIRECTIONS if d != obj.direction]
    return f"Which way does the {obj.color} {obj.shape} move?", options


def _ask_shape_by_color(clip, rng):
    obj = _pick(rng, clip.objects)
    extra = [_SHAPE_DISTRACTORS[i] for i in rng.choice(len(_SHAPE_DISTRACTORS), 2, replace=False)]
    options = [obj.shape] + [s for s in SHAPES if s != obj.shape] + extra
    return f"What shape is the {obj.color} object?", options


def _ask_count(clip, rng):
    n = len(clip.objects)
    if n > len(COUNT_WORDS):
        return None
    options = [COUNT_WORDS[n - 1]] + [w for i, w in enumerate(COUNT_WORDS) if i != n - 1]
    return "How many shapes are there in the video?", options


def _ask_moves_or_still(clip, rng):
    obj = _pick(rng, clip.objects)
    right, wrong = ("it stays still", "it moves") if obj.direction == "still" else ("it moves", "it stays still")
    extra = [_CHANGE_DISTRACTORS[i] for i in rng.choice(len(_CHANGE_DISTRACTORS), 3, replace=False)]
    return f"Does the {obj.color} {obj.shape} move or stay still?", [right, wrong] + extra


_ASKERS = {"color_by_motion": _ask_color_by_motion, "direction": _ask_direction,
           "shape_by_color": _ask_shape_by_color, "count": _ask_count,
           "moves_or_still": _ask_moves_or_still}


def make_question(clip: ShapesClip, rng: np.random.Generator, kind: str | None = None) -> dict:
    """An EgoSchema-style question: 5 distinct options, exactly one right.

    Each asker returns the right option first (or None when the question would
    be ambiguous for this clip); the options are then shuffled so that the
    answer's position is uniform.
    """
    kinds = [kind] if kind is not None else list(QUESTION_KINDS)
    for k in kinds:
        if k not in _ASKERS:
            raise ValueError(f"unknown question kind {k!r}")
    order = rng.permutation(len(kinds))
    for i in order:
        asked = _ASKERS[kinds[i]](clip, rng)
        if asked is None:
            continue
        question, options = asked
        perm = rng.permutation(len(options))
        return {"question": question, "options": [options[j] for j in perm],
                "answer": int(np.flatnonzero(perm == 0)[0]), "kind": kinds[i]}
    raise ValueError(f"no unambiguous question of kind {kind!r} for this clip")


# ------------------------------------------------------------- random access
class ShapesWorld:
    """Deterministic random-access generator: (seed, split, index) -> one item.

    Every item has its own generator seeded by (seed, split, index, stream), so
    item i is identical whatever order or process asks for it.
    """

    _STREAM_CLIP, _STREAM_CAPTION, _STREAM_QUESTION = 0, 1, 2

    def __init__(self, seed: int = 0, size: int = 64, num_frames: int = 16):
        if seed < 0:
            raise ValueError("seed must be non-negative")
        self.seed, self.size, self.num_frames = int(seed), int(size), int(num_frames)

    def _rng(self, split: str, index: int, stream: int) -> np.random.Generator:
        _check_split(split)
        if index < 0:
            raise IndexError(f"index must be non-negative, got {index}")
        return np.random.default_rng([self.seed, SPLITS.index(split), int(index), stream])

    def clip(self, split: str, index: int) -> ShapesClip:
        rng = self._rng(split, index, self._STREAM_CLIP)
        return sample_clip(rng, split, num_frames=self.num_frames)

    def caption(self, split: str, index: int, clip: ShapesClip | None = None) -> str:
        clip = clip if clip is not None else self.clip(split, index)
        return caption(clip, self._rng(split, index, self._STREAM_CAPTION))

    def question(self, split: str, index: int, clip: ShapesClip | None = None) -> dict:
        clip = clip if clip is not None else self.clip(split, index)
        return make_question(clip, self._rng(split, index, self._STREAM_QUESTION))

    def sample(self, split: str, index: int) -> dict:
        clip = self.clip(split, index)
        return {"video": render(clip, self.size), "caption": self.caption(split, index, clip),
                "clip": clip, "question": self.question(split, index, clip)}


class ShapesVideoDataset(torch.utils.data.Dataset):
    """Shapes clips as float videos (frames, 3, size, size) in [-1, 1], made on the fly."""

    def __init__(self, split: str = "train", size: int = 32, length: int | None = None,
                 seed: int = 0, num_frames: int = 16):
        _check_split(split)
        if length is None:
            length = SPLIT_SIZES[split] or 10**6
        self.split, self.length = split, int(length)
        self.world = ShapesWorld(seed=seed, size=size, num_frames=num_frames)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(index)
        clip = self.world.clip(self.split, index)
        frames = torch.from_numpy(render(clip, self.world.size)).permute(0, 3, 1, 2)
        return {"video": frames.float() / 127.5 - 1.0,
                "caption": self.world.caption(self.split, index, clip),
                "index": int(index), "heldout": clip.heldout}
