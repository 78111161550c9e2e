"""Attribute probe: read colour, shape, count and direction out of a Shapes clip.

Works on any clip, rendered or generated (blurry, noisy, slightly off colours),
at any resolution; geometry is reported in 64-px canvas units. Method:

1. each pixel takes the palette colour whose direction in RGB space is nearest
   (so blur, which mixes a colour with the black background, keeps its label),
   if it is bright enough and close enough in angle;
2. per colour and frame, the largest 8-connected component is the object
   (specks of noise or artefacts elsewhere are dropped, and so are rims that
   a codec's chroma subsampling gives a different hue);
3. the shape comes from blur-robust moments of the object's luminance around
   that component (its dim halo included): vertical skewness singles out the
   apex-up triangle, a fourth-order cumulant ratio tells a disc from a square;
   both are medians over frames;
4. the direction is the least-squares velocity of the centre track.
"""
from __future__ import annotations

import itertools
import logging
import math
import re
from dataclasses import dataclass

import numpy as np

from divot.shapes import CANVAS, COLORS, SHAPES

logger = logging.getLogger(__name__)

_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[c] for c in _NAMES], dtype=np.float32)
_PALETTE_NORM = np.linalg.norm(_PALETTE, axis=1)
_UNIT = _PALETTE / _PALETTE_NORM[:, None]
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # Rec. 601, as in codecs
_PALETTE_LUMA = _PALETTE @ _LUMA
# The closest palette pair (blue/purple) is ~26 degrees apart; 20 degrees keeps
# off-colour pixels out without rejecting tinted ones.
MAX_ANGLE_DEG = 20.0
# Fraction of the palette colour's intensity a pixel needs: half-covered edge
# pixels count, the dark halo of a blur does not.
MIN_ALPHA = 0.5
# Shape moments weigh pixels by luminance relative to the object's colour; the
# floor keeps background noise out of them.
LUMA_FLOOR = 0.05
# An object's smallest area (triangle, half-extent 6) is 72 px^2 at 64 px.
MIN_AREA_64 = 18.0
MIN_PRESENCE = 0.5  # fraction of frames an object must be seen in
STILL_SPEED = 0.6   # px/frame at 64 px; real motion is >= 1.5
TRIANGLE_SKEW = -0.15  # triangles sit near -0.5 (-0.3 under heavy blur), others near 0
CIRCLE_RHO = 0.18      # discs sit near 1/3, squares near 0


@dataclass(frozen=True)
class ProbedObject:
    color: str
    shape: str
    direction: str
    track: tuple[tuple[float, float], ...]  # centre per frame, 64-px units, NaN if absent


# ------------------------------------------------------------------ input
def _as_frames(video) -> np.ndarray:
    """float32 (f, h, w, 3) in 0..255 from uint8 or float in [-1, 1], channels last or first."""
    if hasattr(video, "detach"):  # a torch tensor; avoid importing torch here
        video = video.detach().cpu()
        video = video.numpy() if str(video.dtype) == "torch.uint8" else video.float().numpy()
    arr = np.asarray(video)
    if arr.ndim != 4:
        raise ValueError(f"expected a 4-d video, got shape {arr.shape}")
    if arr.shape[-1] != 3 and arr.shape[1] == 3:
        arr = arr.transpose(0, 2, 3, 1)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32)
    return (np.clip(arr.astype(np.float32), -1.0, 1.0) + 1.0) * 127.5


def classify_pixels(frames: np.ndarray) -> np.ndarray:
    """Per-pixel palette index (f, h, w), -1 for background or off-palette.

    A pixel is labelled when its hue is within MAX_ANGLE_DEG of a palette
    colour and it holds at least MIN_ALPHA of that colour's intensity.
    """
    flat = frames.reshape(-1, 3)
    # Background dominates; only pixels that could reach MIN_ALPHA are scored
    # (a pixel's norm is at most sqrt(3) times its largest channel).
    floor = MIN_ALPHA * float(_PALETTE_NORM.min())
    # (Channel-wise maximum: numpy's max over a length-3 axis is ~30x slower.)
    bright = np.maximum(np.maximum(flat[:, 0], flat[:, 1]), flat[:, 2])
    idx = np.flatnonzero(bright >= floor / math.sqrt(3.0))
    pix = flat[idx]
    norm = np.sqrt((pix * pix) @ np.ones(3, np.float32))
    cos = (pix @ _UNIT.T) / np.maximum(norm, 1e-6)[:, None]
    best = np.argmax(cos, axis=1)
    best_cos = cos[np.arange(len(idx)), best]
    alpha = norm * best_cos / _PALETTE_NORM[best]
    ok = (best_cos >= math.cos(math.radians(MAX_ANGLE_DEG))) & (alpha >= MIN_ALPHA)
    labels = np.full(len(flat), -1, dtype=np.int64)
    labels[idx[ok]] = best[ok]
    return labels.reshape(frames.shape[:-1])


# ------------------------------------------------------- connected parts
def _neighbourhood(arr: np.ndarray, fill, reduce) -> np.ndarray:
    """3x3 min or max filter over the last two axes (``reduce`` is np.minimum/np.maximum)."""
    f, h, w = arr.shape
    pad = np.full((f, h + 2, w + 2), fill, dtype=arr.dtype)
    pad[:, 1:-1, 1:-1] = arr
    # Separable: a 3x3 window is a 3-row window of 3-column windows.
    cols = reduce(reduce(pad[:, :, :-2], pad[:, :, 1:-1]), pad[:, :, 2:])
    return reduce(reduce(cols[:, :-2], cols[:, 1:-1]), cols[:, 2:])


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Per frame, keep only the largest 8-connected component of ``mask`` (f, h, w).

    Pure numpy (scipy is optional in this project): each pixel's label starts
    as its flat index and repeatedly takes the 3x3 minimum, with pointer
    jumping (a label names a pixel of the same component, whose label may be
    borrowed) so convex blobs converge in a few rounds.
    """
    f, h, w = mask.shape
    bg = mask.size
    lab = np.where(mask, np.arange(bg).reshape(f, h, w), bg)
    while True:
        new = np.where(mask, _neighbourhood(lab, bg, np.minimum), bg)
        ext = np.append(new.reshape(-1), bg)
        new = np.minimum(new, ext[new])
        if np.array_equal(new, lab):
            break
        lab = new
    counts = np.bincount(lab.reshape(-1), minlength=bg + 1)[:bg].reshape(f, h * w)
    best = np.argmax(counts, axis=1) + np.arange(f) * h * w
    return mask & (lab == best[:, None, None])


def _crop_box(mask: np.ndarray, margin: int) -> tuple[slice, slice]:
    rows, cols = np.flatnonzero(mask.any(axis=(0, 2))), np.flatnonzero(mask.any(axis=(0, 1)))
    h, w = mask.shape[1:]
    return (slice(max(rows[0] - margin, 0), min(rows[-1] + margin + 1, h)),
            slice(max(cols[0] - margin, 0), min(cols[-1] + margin + 1, w)))


# --------------------------------------------------------------- features
def _moments(weight: np.ndarray) -> dict[str, np.ndarray]:
    """Per-frame mass, centroid and shape statistics of a soft mask (f, h, w).

    ``skew`` is the vertical skewness (an apex-up triangle is bottom-heavy,
    about -0.57; circles and squares 0). ``rho`` = k22 / mean(k40, k04) from
    fourth-order cumulants: 1/3 for a disc, 0 for an axis-aligned square.
    Higher cumulants are additive under convolution and vanish for a Gaussian,
    so blur leaves k3/k4 unchanged and only dilutes the normalised skew.
    """
    f, h, w = weight.shape
    mass = np.maximum(weight.sum(axis=(1, 2)), 1e-6)
    ys, xs = np.arange(h) + 0.5, np.arange(w) + 0.5
    mx = (weight.sum(axis=1) @ xs) / mass
    my = (weight.sum(axis=2) @ ys) / mass
    x = xs[None, None, :] - mx[:, None, None]
    y = ys[None, :, None] - my[:, None, None]
    wx2, wy2 = weight * (x * x), weight * (y * y)

    def mean(a):
        return a.sum(axis=(1, 2)) / mass

    m20, m02, m11 = mean(wx2), mean(wy2), mean(weight * (x * y))
    k40 = mean(wx2 * x * x) - 3 * m20 ** 2
    k04 = mean(wy2 * y * y) - 3 * m02 ** 2
    k22 = mean(wx2 * y * y) - m20 * m02 - 2 * m11 ** 2
    skew = mean(wy2 * y) / np.maximum(m02, 1e-6) ** 1.5
    rho = k22 / np.minimum((k40 + k04) / 2, -1e-6)
    return {"mass": mass, "x": mx, "y": my, "skew": skew, "rho": rho}


def _classify_shape(skew: float, rho: float) -> str:
    if skew < TRIANGLE_SKEW:
        return "triangle"
    return "circle" if rho > CIRCLE_RHO else "square"


def _direction(track: np.ndarray) -> str:
    ok = ~np.isnan(track[:, 0])
    t = np.flatnonzero(ok).astype(np.float64)
    if len(t) < 2:
        return "still"
    t_c = t - t.mean()
    vel = (t_c @ (track[ok] - track[ok].mean(axis=0))) / max(float(t_c @ t_c), 1e-9)
    vx, vy = float(vel[0]), float(vel[1])
    if math.hypot(vx, vy) < STILL_SPEED:
        return "still"
    if abs(vx) >= abs(vy):
        return "right" if vx > 0 else "left"
    return "down" if vy > 0 else "up"


@dataclass(frozen=True, eq=False)  # holds arrays: compare by identity
class _Blob:
    """One colour's largest component per frame, full-frame (f, h, w)."""

    color: int
    comp: np.ndarray
    present: np.ndarray  # (f,) frames where the component is big enough

    @property
    def area(self) -> int:
        return int(self.comp.sum())


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        mask = _neighbourhood(mask, False, np.maximum)
    return mask


def _find_blobs(labels: np.ndarray, min_area: float) -> list[_Blob]:
    f = labels.shape[0]
    counts = np.bincount(labels[labels >= 0], minlength=len(_NAMES))
    blobs = []
    for ci in np.flatnonzero(counts >= min_area * f * MIN_PRESENCE):
        mask = labels == ci
        rows, cols = _crop_box(mask, 0)
        comp = np.zeros_like(mask)
        comp[:, rows, cols] = largest_component(mask[:, rows, cols])
        present = comp.sum(axis=(1, 2)) >= min_area
        if present.sum() >= max(1, math.ceil(MIN_PRESENCE * f)):
            blobs.append(_Blob(int(ci), comp, present))
    return blobs


def _drop_fringes(blobs: list[_Blob], margin: int) -> list[_Blob]:
    """Drop blobs lying mostly along the rim of a bigger one.

    Codecs subsample chroma, so the rim of (say) a yellow square can decode as
    a whitish ring; real objects keep MIN_GAP apart, so a blob that sits mostly
    within ``margin`` pixels of a bigger blob is such a rim, not an object.
    """
    kept: list[_Blob] = []
    for blob in sorted(blobs, key=lambda b: -b.area):
        if all(np.count_nonzero(blob.comp & _dilate(big.comp, margin)) * 2 < blob.area
               for big in kept):
            kept.append(blob)
    return kept


def _describe(blob: _Blob, others: np.ndarray, luma: np.ndarray, scale: float,
              margin: int) -> ProbedObject:
    """Shape, direction and track of one blob; ``others`` masks the other objects."""
    rows, cols = _crop_box(blob.comp, margin)
    region = _dilate(blob.comp[:, rows, cols], margin) & ~others[:, rows, cols]
    # Shape comes from luminance, which codecs keep at full resolution while
    # chroma (and so the colour labels) is smeared over 2x2 blocks.
    ratio = luma[:, rows, cols] / _PALETTE_LUMA[blob.color]
    weight = np.clip((ratio - LUMA_FLOOR) / (1.0 - LUMA_FLOOR), 0.0, 1.0)
    mom = _moments(np.where(region, weight, 0.0))
    present = blob.present
    shape = _classify_shape(float(np.median(mom["skew"][present])),
                            float(np.median(mom["rho"][present])))
    x, y = mom["x"] + cols.start, mom["y"] + rows.start
    if shape == "triangle":
        # An apex-up triangle's centroid lies s/3 below its centre; area = 2 s^2.
        y = y - np.sqrt(mom["mass"] / 2.0) / 3.0
    track = np.stack([x, y], axis=1) / scale
    track[~present] = np.nan
    return ProbedObject(_NAMES[blob.color], shape, _direction(track),
                        tuple((float(a), float(b)) for a, b in track))


def probe_clip(video) -> list[ProbedObject]:
    """Objects found in ``video`` (uint8 (f,h,w,3) or float (f,3,h,w) in [-1,1])."""
    frames = _as_frames(video)
    scale = frames.shape[2] / CANVAS
    min_area = max(2.0, MIN_AREA_64 * scale * scale)
    margin = max(1, round(2 * scale))  # enough to hold a blur's halo
    blobs = _drop_fringes(_find_blobs(classify_pixels(frames), min_area), margin)
    luma = frames @ _LUMA
    found = []
    for blob in sorted(blobs, key=lambda b: b.color):
        others = np.zeros_like(blob.comp)
        for other in blobs:
            if other is not blob:
                others |= other.comp
        found.append(_describe(blob, others, luma, scale, margin))
    logger.debug("probe found %s", [(o.color, o.shape, o.direction) for o in found])
    return found


# ---------------------------------------------------------------- scoring
def _attrs(obj, check) -> tuple:
    get = obj.get if isinstance(obj, dict) else lambda k: getattr(obj, k)
    return tuple(get(k) for k in check)


def _match(found: list, wanted: list, check) -> bool:
    """One-to-one match on the checked attributes (and equal counts)."""
    if len(found) != len(wanted):
        return False
    want = [_attrs(o, check) for o in wanted]
    have = [_attrs(o, check) for o in found]
    return any(all(have[i] == want[j] for i, j in enumerate(perm))
               for perm in itertools.permutations(range(len(want))))


def probe_agrees(probed: list[ProbedObject], clip, check=("color", "shape", "direction")) -> bool:
    """True iff the probed objects match ``clip.objects`` one-to-one on ``check``."""
    return _match(list(probed), list(clip.objects), tuple(check))


_COLOR_RE = re.compile(r"\b(" + "|".join(COLORS) + r")\b")
_SHAPE_RE = re.compile(r"\b(" + "|".join(SHAPES) + r")s?\b")
_STILL_RE = re.compile(r"\b(still|stationary|not mov\w*|in place|motionless)\b")
_DIR_RE = re.compile(r"\b(left|right|up|down)(ward)?s?\b")
_SPLIT_RE = re.compile(r"\s*,?\s*\band\b\s*|\s*[,;.]\s*")


def agreement_rates(probed: list[list[ProbedObject]], clips) -> dict[str, float]:
    """Over clips already probed (:func:`probe_clip` of each) and their scenes: the fraction
    whose colour, shape and direction each read right, and whose all three do (``"all"``, the
    probe agreement)."""
    rates = {a: sum(probe_agrees(p, c, check=(a,)) for p, c in zip(probed, clips)) / len(clips)
             for a in ("color", "shape", "direction")}
    rates["all"] = sum(probe_agrees(p, c) for p, c in zip(probed, clips)) / len(clips)
    return rates


def shape_confusion(probed: list[list[ProbedObject]], clips) -> dict[str, dict[str, int]]:
    """How each true object's shape was read: ``{true shape: {read shape: count}}``.

    An object is paired with the probed object of its colour (the probe keeps one object per
    colour); ``"missing"`` counts objects whose colour was not found. Shows, for example, that
    ragged reconstructions read as discs (docs/TOKENIZER_TRAINING.md, finding 17).
    """
    table = {s: {r: 0 for r in (*SHAPES, "missing")} for s in SHAPES}
    for found, clip in zip(probed, clips):
        by_color = {o.color: o.shape for o in found}
        for obj in clip.objects:
            table[obj.shape][by_color.get(obj.color, "missing")] += 1
    return table


def attributes_from_caption(text: str) -> list[dict]:
    """Parse a caption ("a red circle moves left and a ...") to [{color, shape, direction}].

    Phrases without both a colour and a shape are skipped; a phrase with no
    motion word counts as "still".
    """
    out = []
    for phrase in _SPLIT_RE.split(text.lower()):
        color, shape = _COLOR_RE.search(phrase), _SHAPE_RE.search(phrase)
        if not (color and shape):
            continue
        if _STILL_RE.search(phrase):
            direction = "still"
        else:
            moved = _DIR_RE.search(phrase)
            direction = moved.group(1) if moved else "still"
        out.append({"color": color.group(1), "shape": shape.group(1), "direction": direction})
    return out


def probe_agrees_caption(probed: list[ProbedObject], text: str,
                         check=("color", "shape", "direction")) -> bool:
    """True iff the probed objects match the caption's objects one-to-one on ``check``."""
    return _match(list(probed), attributes_from_caption(text), tuple(check))
