"""Replication report (eval/replication.py, eval/copy_detection.py): a planted set of copied and
fresh Shapes clips, exact search against brute force, motion tracks, the script end to end."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from divot.shapes import COLORS, SHAPES, ShapesWorld, render
from divot.video_io import read_clip, resize_center_crop, write_video
from eval import copy_detection as cd
from eval import replication

from _llm_fixtures import make_tiny_run

pytestmark = pytest.mark.usefixtures("one_thread")

WORLD = ShapesWorld(seed=replication.WORLD_SEED)
NUM_TRAIN = 24
COPIED = (3, 7, 11, 17, 20)  # training indices the planted copies come from


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("rep_run"), detokenizer=False) / "tokenizer"


@pytest.fixture(scope="module")
def descriptor(tokenizer_dir):
    return cd.DivotViTDescriptor.from_tokenizer_dir(tokenizer_dir)


def train_videos(count=NUM_TRAIN):
    return [render(WORLD.clip("train", i), 64) for i in range(count)]


def shift_right(video, pixels=1):
    out = np.zeros_like(video)
    out[:, :, pixels:] = video[:, :, :-pixels]
    return out


def perturbed_copies(train):
    """Exact, noisy, 1-px shifted, brightened and half-resolution copies of COPIED clips."""
    rng = np.random.default_rng(0)
    a, b, c, d, e = (train[i] for i in COPIED)
    noisy = np.clip(b.astype(np.float32) + rng.normal(0, 6, b.shape), 0, 255).astype(np.uint8)
    bright = np.clip(d.astype(np.int16) + 12, 0, 255).astype(np.uint8)
    return [a.copy(), noisy, shift_right(c), bright, resize_center_crop(e, 32)]


def fresh_videos(count=4):
    """Test clips holding a colour-shape pair the training split never has."""
    clips = [WORLD.clip("test", i) for i in range(200)]
    return [render(c, 64) for c in clips if c.heldout][:count]


# ------------------------------------------------------------------ content
def test_planted_copies_flagged_fresh_not(descriptor):
    train = train_videos()
    gen = perturbed_copies(train) + fresh_videos()
    result = replication.replication_report(gen, train, descriptor, worst=3)
    assert result["descriptor"] == "divot-vit (not SSCD)" and result["threshold"] == cd.VIT_THRESHOLD
    rows = result["rows"]
    sims = [r["similarity"] for r in rows]
    copies, fresh = rows[:len(COPIED)], rows[len(COPIED):]
    assert [r["nearest"] for r in copies] == list(COPIED), sims
    assert copies[0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert all(r["similarity"] >= cd.VIT_THRESHOLD for r in copies), sims
    assert all(r["similarity"] < cd.VIT_THRESHOLD for r in fresh), sims
    assert result["fraction_replicated"] == pytest.approx(len(COPIED) / len(gen))
    assert result["num_generated"] == len(gen) and result["num_train"] == NUM_TRAIN
    assert result["mean_top_similarity"] == pytest.approx(np.mean(sims))
    assert len(result["worst"]) == 3 and set(result["worst"]) <= set(range(len(COPIED)))  # copies are worst
    assert sims[result["worst"][0]] == max(sims)
    assert all(sims[i] >= sims[j] for i, j in zip(result["worst"], result["worst"][1:]))


def test_clip_descriptors_unit_and_centered():
    rng = np.random.default_rng(1)
    raw = rng.normal(size=(6, 5, 8)).astype(np.float32) + 50.0  # a large shared component
    plain, centered = cd.clip_descriptors(raw), cd.clip_descriptors(raw, raw.reshape(-1, 8).mean(0))
    assert plain.shape == (6, 40)
    np.testing.assert_allclose(np.linalg.norm(centered, axis=1), 1.0, rtol=1e-5)
    off_diag = ~np.eye(6, dtype=bool)
    # Without centring every pair looks alike; centring removes the shared part.
    assert (plain @ plain.T)[off_diag].min() > 0.99
    assert (centered @ centered.T)[off_diag].max() < 0.9


def test_nearest_equals_brute_force():
    rng = np.random.default_rng(2)
    q, k = rng.normal(size=(37, 19)), rng.normal(size=(101, 19))
    k[50] = k[10]  # a tie: the lower index wins, as argmax gives
    q[0] = k[10] * 3
    sims, index = cd.nearest(q, k, chunk=8)
    full = q @ k.T
    np.testing.assert_array_equal(index, full.argmax(axis=1))
    np.testing.assert_allclose(sims, full.max(axis=1), rtol=1e-5)
    assert index[0] == 10
    big_sims, big_index = cd.nearest(q, k)
    np.testing.assert_array_equal(big_index, index)
    with pytest.raises(ValueError, match="keys"):
        cd.nearest(q, k[:, :5])


def test_pick_frames_rejects_bad_video_and_pads_short():
    with pytest.raises(ValueError, match="uint8"):
        cd._pick_frames(np.zeros((16, 8, 8, 3), np.float32))
    short = np.arange(4, dtype=np.uint8)[:, None, None, None] * np.ones((4, 2, 2, 3), np.uint8)
    assert cd._pick_frames(short)[:, 0, 0, 0].tolist() == [0, 3, 3, 3, 3]


# ------------------------------------------------------------------ motion
def recoloured(clip):
    """The same trajectories with other colours and shapes: motion copied, appearance not."""
    used = {o.color for o in clip.objects}
    spare = [c for c in COLORS if c not in used]
    objects = tuple(dataclasses.replace(o, color=spare[i], shape=SHAPES[(SHAPES.index(o.shape) + 1) % 3])
                    for i, o in enumerate(clip.objects))
    return dataclasses.replace(clip, objects=objects)


def test_motion_flags_copied_trajectory():
    train_clips = [WORLD.clip("train", i) for i in range(16)]
    train = np.stack([cd.motion_tracks(render(c, 64)) for c in train_clips])
    moving = next(i for i, c in enumerate(train_clips) if any(o.direction != "still" for o in c.objects))
    fresh = [WORLD.clip("test", i) for i in range(3)]
    gen_videos = [render(recoloured(train_clips[moving]), 32)] + [render(c, 64) for c in fresh]
    gen_videos.append(np.zeros((16, 32, 32, 3), np.uint8))  # nothing to track
    sims, index = cd.nearest_motion(np.stack([cd.motion_tracks(v) for v in gen_videos]), train, chunk=5)
    assert index[0] == moving and sims[0] >= 0.8, sims
    assert np.all(sims[1:4] < cd.MOTION_THRESHOLD), sims
    assert np.isnan(sims[4]) and index[4] == -1


# ------------------------------------------------------------------ the script
def write_set(folder, videos, prefix):
    folder.mkdir(parents=True, exist_ok=True)
    for i, v in enumerate(videos):
        write_video(folder / f"{prefix}{i}.mp4", v)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("rep_videos")
    train = train_videos(8)
    gen = [train[2], shift_right(train[5])] + fresh_videos(2)
    return write_set(root / "gen", gen, "g"), write_set(root / "train", train, "t")


def last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_script_end_to_end_divot_vit_and_resume(folders, tokenizer_dir, tmp_path, capsys):
    gen_dir, train_dir = folders
    out = tmp_path / "out"
    argv = ["--generated", str(gen_dir), "--train", str(train_dir), "--tokenizer", str(tokenizer_dir),
            "--output-dir", str(out), "--worst", "2", "--size", "64"]
    result = replication.main(argv)
    headline = last_json(capsys)
    assert headline["descriptor"] == "divot-vit (not SSCD)" and headline["num_generated"] == 4
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_train"] == 8 and metrics["fraction_replicated"] == pytest.approx(0.5)
    rows = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert [r["nearest"] for r in rows[:2]] == ["train/t2.mp4", "train/t5.mp4"]
    videos = sorted((out / "worst").glob("*.mp4"))
    assert len(videos) == 2 and videos[0].name.startswith("00_g0.mp4__train_t2.mp4")
    pair = read_clip(videos[0])
    assert pair.shape == (16, 64, 64 * 2 + 2, 3)  # generated | gap | training clip
    assert len(list((out / "features" / "train").glob("*.npz"))) == 8
    # A rerun reuses the cached features and gives the same numbers.
    stamps = {p: p.stat().st_mtime_ns for p in (out / "features").rglob("*.npz")}
    again = replication.main(argv)
    assert {p: p.stat().st_mtime_ns for p in (out / "features").rglob("*.npz")} == stamps
    assert again["mean_top_similarity"] == pytest.approx(result["mean_top_similarity"])
    with pytest.raises(SystemExit, match="other settings"):
        replication.main(argv[:-2] + ["--size", "48"])


class TinyDescriptor(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 8, stride=8)
        self.fc = torch.nn.Linear(8 * 4, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 2)
        return torch.nn.functional.normalize(self.fc(h.flatten(1)), dim=1)


@pytest.fixture(scope="module")
def sscd_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sscd") / "sscd.torchscript.pt"
    torch.jit.script(TinyDescriptor()).save(str(path))
    return path


def test_script_with_torchscript_sscd(folders, sscd_file, tmp_path, capsys):
    path = sscd_file
    gen_dir, _ = folders
    out = tmp_path / "out"
    result = replication.main(["--generated", str(gen_dir), "--train", "shapes", "--num-train", "8",
                               "--sscd", str(path), "--output-dir", str(out), "--worst", "1", "--size", "64"])
    headline = last_json(capsys)
    assert headline["descriptor"] == "sscd" and headline["threshold"] == cd.SSCD_THRESHOLD
    rows = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert rows[0]["nearest"] == "train-2" and rows[0]["similarity"] > 0.99  # an mp4 of Shapes train clip 2
    assert len(list((out / "worst").glob("*.mp4"))) == 1
    assert json.loads((out / "settings.json").read_text())["sscd"] == str(path.resolve())
    assert result["motion_num_scored"] == 4


def test_script_bad_inputs(folders, sscd_file, tmp_path):
    gen_dir, _ = folders
    base = ["--generated", str(gen_dir), "--output-dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="neither 'shapes'"):
        replication.main(base + ["--train", str(tmp_path / "missing"), "--sscd", str(sscd_file)])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(SystemExit, match="bad.mp4"):
        replication.main(["--generated", str(broken), "--output-dir", str(tmp_path / "o2"),
                          "--sscd", str(sscd_file), "--num-train", "2"])
    with pytest.raises(SystemExit, match="cannot load the SSCD"):
        replication.main(base + ["--sscd", __file__])
    bad_jsonl = tmp_path / "train.jsonl"
    bad_jsonl.write_text('{"path": "x.mp4"}\n')
    with pytest.raises(ValueError, match="line 1"):
        replication.jsonl_clips(bad_jsonl, 64)


def test_script_generates_from_checkpoint(tmp_path, capsys):
    ckpt = make_tiny_run(tmp_path / "run") / "llm"
    out = tmp_path / "out"
    argv = ["--checkpoint", str(ckpt), "--num-prompts", "2", "--steps", "2", "--num-train", "4",
            "--output-dir", str(out), "--worst", "1", "--size", "32", "--device", "cpu"]
    result = replication.main(argv)
    assert last_json(capsys)["num_generated"] == 2 and result["num_train"] == 4
    made = sorted(p.name for p in (out / "generated").glob("*.mp4"))
    assert made == ["test-0.mp4", "test-1.mp4"]
    settings = json.loads((out / "settings.json").read_text())
    assert settings["generated"]["checkpoint"] == str(ckpt.resolve())
    assert settings["tokenizer"] == str(ckpt)  # the pipeline's own tokenizer ViT
    stamps = {p: p.stat().st_mtime_ns for p in (out / "generated").glob("*.mp4")}
    replication.main(argv)  # a rerun reuses the videos it made
    assert {p: p.stat().st_mtime_ns for p in (out / "generated").glob("*.mp4")} == stamps
