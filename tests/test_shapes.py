"""The Shapes world (generator, captions, questions) and its attribute probe."""
from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from divot.probe import (ProbedObject, attributes_from_caption, probe_agrees,
                         probe_agrees_caption, probe_clip, shape_confusion)
from divot.shapes import (COLORS, DIRECTIONS, HELDOUT_PAIRS, MIN_GAP, SHAPES,
                          ShapesClip, ShapesVideoDataset, ShapesWorld, canonical_caption,
                          caption, make_question, render, sample_clip)

REPO = Path(__file__).resolve().parents[1]


def _clips(split: str, n: int, seed: int = 0) -> list[ShapesClip]:
    world = ShapesWorld(seed=seed)
    return [world.clip(split, i) for i in range(n)]


def _blur(video: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur over h and w of float (f, h, w, c)."""
    pad = np.pad(video, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    rows = 0.25 * pad[:, :-2] + 0.5 * pad[:, 1:-1] + 0.25 * pad[:, 2:]
    return 0.25 * rows[:, :, :-2] + 0.5 * rows[:, :, 1:-1] + 0.25 * rows[:, :, 2:]


# ------------------------------------------------------------- generator
def test_same_seed_split_index_gives_identical_items():
    a, b = ShapesWorld(seed=3), ShapesWorld(seed=3)
    forward = [a.sample("val", i) for i in range(6)]
    backward = [b.sample("val", i) for i in reversed(range(6))][::-1]
    for x, y in zip(forward, backward):
        assert np.array_equal(x["video"], y["video"])
        assert x["caption"] == y["caption"] and x["clip"] == y["clip"]
        assert x["question"] == y["question"]
    assert forward[0]["clip"] != forward[1]["clip"]
    assert ShapesWorld(seed=4).clip("val", 0) != forward[0]["clip"]
    assert a.clip("train", 0) != a.clip("test", 0)


def test_heldout_pairs_never_in_train_and_common_in_test():
    train = _clips("train", 2000)
    pairs = {(o.color, o.shape) for c in train for o in c.objects}
    assert not pairs & HELDOUT_PAIRS
    assert not any(c.heldout for c in train)
    test = _clips("test", 200)
    assert sum(c.heldout for c in test) >= 40
    seen = {(o.color, o.shape) for c in test for o in c.objects}
    assert HELDOUT_PAIRS <= seen


def test_objects_stay_on_canvas_and_apart():
    clips = _clips("train", 1000) + _clips("test", 500)
    counts = Counter(len(c.objects) for c in clips)
    assert set(counts) == {1, 2} and 0.2 < counts[2] / len(clips) < 0.5
    t = np.arange(16)
    for clip in clips:
        for o in clip.objects:
            assert o.shape in SHAPES and o.color in COLORS and o.direction in DIRECTIONS
            assert 6 <= o.size <= 10
            assert (o.speed == 0) == (o.direction == "still")
            assert o.direction == "still" or 1.5 <= o.speed <= 2.5
            x, y = o.position(t)
            assert np.all(x - o.size >= -1e-9) and np.all(x + o.size <= 64 + 1e-9)
            assert np.all(y - o.size >= -1e-9) and np.all(y + o.size <= 64 + 1e-9)
        if len(clip.objects) == 2:
            a, b = clip.objects
            assert a.color != b.color
            (ax, ay), (bx, by) = a.position(t), b.position(t)
            gap = np.maximum(np.abs(ax - bx), np.abs(ay - by)) - a.size - b.size
            assert gap.min() >= MIN_GAP - 1e-9


def test_render_shapes_sizes_and_colours():
    clip = sample_clip(np.random.default_rng(0), "train", num_objects=1)
    v64, v32 = render(clip, 64), render(clip, 32)
    assert v64.shape == (16, 64, 64, 3) and v64.dtype == np.uint8
    assert v32.shape == (16, 32, 32, 3)
    # The 32-px render is the same scene: about a quarter of the lit pixels.
    lit64, lit32 = (v64.max(-1) > 128).sum(), (v32.max(-1) > 128).sum()
    assert 0.2 < lit32 / lit64 < 0.3
    o = clip.objects[0]
    x, y = o.position(0)
    assert tuple(v64[0, int(y), int(x)]) == COLORS[o.color]


def test_dataset_items():
    ds = ShapesVideoDataset("test", size=32)
    assert len(ds) == 512 and len(ShapesVideoDataset("train")) >= 10**5
    item = ds[5]
    assert item["video"].shape == (16, 3, 32, 32) and item["video"].dtype == torch.float32
    assert item["video"].min() >= -1 and item["video"].max() <= 1
    assert item["index"] == 5 and isinstance(item["caption"], str)
    clip = ds.world.clip("test", 5)
    assert item["heldout"] == clip.heldout
    expected = torch.from_numpy(render(clip, 32)).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.equal(item["video"], expected)
    with pytest.raises(IndexError):
        ds[len(ds)]


# ------------------------------------------------------- captions, questions
def _same_objects(parsed: list[dict], clip: ShapesClip) -> bool:
    want = sorted((o.color, o.shape, o.direction) for o in clip.objects)
    return sorted((p["color"], p["shape"], p["direction"]) for p in parsed) == want


def test_captions_parse_back_to_the_clip():
    rng = np.random.default_rng(1)
    phrasings = set()
    for clip in _clips("test", 500):
        text = caption(clip, rng)
        phrasings.add(text.split(" ", 3)[-1])
        assert _same_objects(attributes_from_caption(text), clip), text
        assert _same_objects(attributes_from_caption(canonical_caption(clip)), clip)
        assert canonical_caption(clip) == canonical_caption(clip)
    assert len(phrasings) > 20


def test_caption_parser_tolerates_other_wordings():
    got = attributes_from_caption("A Red circle is moving to the left, and a blue "
                                  "square stays still. A white triangle drifts upward!")
    assert got == [{"color": "red", "shape": "circle", "direction": "left"},
                   {"color": "blue", "shape": "square", "direction": "still"},
                   {"color": "white", "shape": "triangle", "direction": "up"}]
    assert attributes_from_caption("nothing here") == []


def _check_answer(q: dict, clip: ShapesClip) -> None:
    answer, text = q["options"][q["answer"]], q["question"]
    objs = clip.objects
    if q["kind"] == "count":
        assert answer == ("one", "two")[len(objs) - 1]
    elif q["kind"] == "color_by_motion":
        words = text.rstrip("?").split()
        direction = next(d for d in DIRECTIONS if d in words)
        movers = [o for o in objs if o.direction == direction]
        assert len(movers) == 1 and answer == movers[0].color
    else:
        obj = next(o for o in objs if o.color in text)
        assert (q["kind"] == "shape_by_color") == (obj.shape not in text)
        if q["kind"] == "shape_by_color":
            assert answer == obj.shape
        elif q["kind"] == "direction":
            assert attributes_from_caption(f"a {obj.color} {obj.shape} moves {answer}")[0][
                "direction"] == obj.direction
        else:
            assert answer == ("it stays still" if obj.direction == "still" else "it moves")


def test_questions_are_right_and_answer_positions_uniform():
    rng = np.random.default_rng(2)
    positions, kinds = Counter(), Counter()
    for clip in _clips("test", 2000):
        q = make_question(clip, rng)
        assert len(q["options"]) == 5 and len(set(q["options"])) == 5
        assert 0 <= q["answer"] < 5
        _check_answer(q, clip)
        positions[q["answer"]] += 1
        kinds[q["kind"]] += 1
    assert len(kinds) == 5 and min(kinds.values()) > 200
    assert all(330 < positions[i] < 470 for i in range(5)), positions


def test_every_kind_can_be_forced_when_unambiguous():
    rng = np.random.default_rng(3)
    for clip in _clips("val", 300):
        for kind in ("direction", "shape_by_color", "count", "moves_or_still"):
            _check_answer(make_question(clip, rng, kind=kind), clip)
    # Two shapes moving the same way: "the shape that moves left" is ambiguous.
    clip = next(c for c in _clips("val", 2000) if len(c.objects) == 2
                and c.objects[0].direction == c.objects[1].direction)
    with pytest.raises(ValueError):
        make_question(clip, rng, kind="color_by_motion")


# ------------------------------------------------------------------- probe
@pytest.mark.parametrize("size", [64, 32])
def test_probe_reads_clean_clips(size):
    clips = _clips("test", 500, seed=11)
    right = sum(probe_agrees(probe_clip(render(c, size)), c) for c in clips)
    assert right >= 0.99 * len(clips), f"probe right on {right}/500 at {size} px"


@pytest.mark.parametrize("size", [64, 32])
def test_probe_survives_noise_and_blur(size):
    rng = np.random.default_rng(5)
    clips = _clips("val", 200, seed=12)
    right = 0
    for clip in clips:
        video = _blur(render(clip, size).astype(np.float32)) / 127.5 - 1.0
        video = video + rng.normal(0.0, 0.05, video.shape)
        tensor = torch.from_numpy(video).float().permute(0, 3, 1, 2)  # (f, 3, h, w)
        right += probe_agrees(probe_clip(tensor), clip)
    assert right >= 0.95 * len(clips), f"probe right on {right}/200 at {size} px"


def test_probe_track_and_helpers():
    clip = _clips("test", 50, seed=13)[7]
    found = probe_clip(render(clip, 64))
    assert all(isinstance(o, ProbedObject) for o in found)
    for obj in clip.objects:
        got = next(o for o in found if o.color == obj.color)
        assert len(got.track) == 16
        x, y = obj.position(np.arange(16))
        err = np.hypot(np.array(got.track)[:, 0] - x, np.array(got.track)[:, 1] - y)
        assert err.max() < 1.0
    assert probe_agrees(found, clip, check=("color",))
    assert probe_agrees_caption(found, canonical_caption(clip))
    spare = next(c for c in COLORS if all(o.color != c for o in clip.objects))
    wrong = canonical_caption(clip).replace(clip.objects[0].color, spare, 1)
    assert not probe_agrees_caption(found, wrong)
    assert probe_clip(np.zeros((16, 32, 32, 3), np.uint8)) == []


def test_probe_agrees_needs_count_and_attributes():
    clip = ShapesClip((sample_clip(np.random.default_rng(0), "train", num_objects=1).objects[0],))
    obj = clip.objects[0]
    track = ((0.0, 0.0),) * 16
    same = ProbedObject(obj.color, obj.shape, obj.direction, track)
    other_dir = "still" if obj.direction != "still" else "left"
    assert probe_agrees([same], clip)
    assert not probe_agrees([], clip) and not probe_agrees([same, same], clip)
    moved = ProbedObject(obj.color, obj.shape, other_dir, track)
    assert not probe_agrees([moved], clip)
    assert probe_agrees([moved], clip, check=("color", "shape"))


# ------------------------------------------------------------------ script
def test_make_shapes_dataset_script(tmp_path):
    video_io = pytest.importorskip("divot.video_io")
    spec = importlib.util.spec_from_file_location(
        "make_shapes_dataset", REPO / "scripts" / "make_shapes_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([str(tmp_path), "--num-train", "3", "--num-val", "2",
                        "--num-test", "4", "--size", "32", "--seed", "1"]) == 0
    for split, n in (("train", 3), ("val", 2), ("test", 4)):
        lines = (tmp_path / "captions" / f"{split}.jsonl").read_text().splitlines()
        assert len(lines) == n
        for line in lines:
            record = json.loads(line)
            assert set(record) == {"video", "caption", "heldout"}
            assert (tmp_path / "captions" / record["video"]).is_file()
    questions = json.loads((tmp_path / "egoschema" / "questions.json").read_text())
    answers = json.loads((tmp_path / "egoschema" / "subset_answers.json").read_text())
    assert len(questions) == 4 and set(answers) == {q["q_uid"] for q in questions}
    for q in questions:
        assert {"q_uid", "question", "kind", "heldout"} | {f"option {i}" for i in range(5)} <= set(q)
        assert 0 <= answers[q["q_uid"]] < 5
        video = video_io.read_clip(tmp_path / "egoschema" / "videos" / f"{q['q_uid']}.mp4")
        assert video.shape == (16, 32, 32, 3)
        assert probe_agrees(probe_clip(video), ShapesWorld(seed=1).clip("test", int(q["q_uid"][-6:])))


def test_long_clips_with_capped_speed_stay_on_canvas():
    # 48 frames cap the speed so the path uses the whole room; rounding once made the
    # start-position range empty (numpy: "high - low < 0").
    world = ShapesWorld(num_frames=48)
    for i in range(60):
        clip = world.clip("test", i)
        for obj in clip.objects:
            for t in (0, 47):
                x, y = obj.position(t)
                assert obj.size - 1e-6 <= x <= 64 - obj.size + 1e-6 and obj.size - 1e-6 <= y <= 64 - obj.size + 1e-6


def test_shape_confusion_counts_reads_and_misses():
    clip = ShapesClip((sample_clip(np.random.default_rng(0), "train", num_objects=1).objects[0],))
    obj = clip.objects[0]
    track = ((0.0, 0.0),) * 16
    other = next(s for s in SHAPES if s != obj.shape)
    probed = [[ProbedObject(obj.color, obj.shape, obj.direction, track)],
              [ProbedObject(obj.color, other, obj.direction, track)], []]
    table = shape_confusion(probed, [clip] * 3)
    assert table[obj.shape][obj.shape] == 1 and table[obj.shape][other] == 1
    assert table[obj.shape]["missing"] == 1
    assert sum(n for row in table.values() for n in row.values()) == 3
