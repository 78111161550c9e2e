"""Generation metrics: Fréchet distance, the I3D network and its pytorch-i3d weights, CLIPSIM
pieces, and eval/generation.py (planted prompt following, end to end on a tiny random run)."""
import dataclasses
import json
import sys

import numpy as np
import pytest
import scipy.linalg
import torch

from divot.modeling import CheckpointError
from divot.shapes import COLORS, ShapesWorld, canonical_caption, render
from eval import clipsim, fvd, generation, i3d

from _llm_fixtures import make_tiny_run

WORLD = ShapesWorld(seed=generation.WORLD_SEED)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("gen_run")) / "llm"


def random_cov(rng, d):
    return np.cov(rng.normal(size=(3 * d, d)), rowvar=False)


# ------------------------------------------------------------------ Fréchet distance
def test_frechet_identical_sets_zero_and_never_negative():
    rng = np.random.default_rng(0)
    for n, d in ((200, 16), (5, 16), (3, 64)):  # n <= d: singular covariances, where naive sqrtm breaks
        feats = rng.normal(size=(n, d)) * rng.uniform(0.01, 10, size=d)
        mu, sigma = fvd.feature_stats(feats)
        value = fvd.frechet_distance(mu, sigma, mu, sigma)
        assert 0.0 <= value < 1e-6 * max(1.0, np.trace(sigma))
        assert fvd.features_distance(feats, feats.copy()) == pytest.approx(value, abs=1e-9)
    for _ in range(20):
        d = int(rng.integers(2, 12))
        a, b = rng.normal(size=(int(rng.integers(2, 6)), d)), rng.normal(size=(int(rng.integers(2, 6)), d))
        assert fvd.features_distance(a, b) >= 0.0


def test_frechet_closed_form_and_symmetry():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    v1, v2 = rng.uniform(0.1, 4, size=8), rng.uniform(0.1, 4, size=8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert fvd.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)
    m1, m2, s1, s2 = rng.normal(size=10), rng.normal(size=10), random_cov(rng, 10), random_cov(rng, 10)
    d12, d21 = fvd.frechet_distance(m1, s1, m2, s2), fvd.frechet_distance(m2, s2, m1, s1)
    assert d12 == pytest.approx(d21, rel=1e-9) and d12 > 0
    # Against the textbook form with a general matrix square root, on well-conditioned input.
    textbook = np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert d12 == pytest.approx(textbook, rel=1e-7)
    # One scalar Gaussian: (m1 - m2)^2 + (s1 - s2)^2.
    assert fvd.frechet_distance([0.0], [[4.0]], [1.0], [[9.0]]) == pytest.approx(1.0 + 1.0)


def test_frechet_bad_input_is_named():
    with pytest.raises(ValueError, match="at least 2"):
        fvd.feature_stats(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="2-d"):
        fvd.feature_stats(np.zeros(4))
    with pytest.raises(ValueError, match="shapes do not fit"):
        fvd.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ------------------------------------------------------------------ I3D
def test_i3d_shapes_names_and_input():
    torch.manual_seed(0)
    model = i3d.I3D().eval()
    state = model.state_dict()
    assert len(state) == 57 * 6 + 2  # 57 conv+BN units (weight + 5 BN entries), logits weight + bias
    assert state["Conv3d_1a_7x7.conv3d.weight"].shape == (64, 3, 7, 7, 7)
    assert "Conv3d_1a_7x7.conv3d.bias" not in state and "Conv3d_1a_7x7.bn.running_var" in state
    assert state["Mixed_3b.b1b.conv3d.weight"].shape == (128, 96, 3, 3, 3)
    assert state["Mixed_5c.b3b.conv3d.weight"].shape == (128, 832, 1, 1, 1)
    assert state["logits.conv3d.weight"].shape == (400, 1024, 1, 1, 1) and state["logits.conv3d.bias"].shape == (400,)
    video = np.random.default_rng(0).integers(0, 256, (5, 24, 40, 3), dtype=np.uint8)
    x = i3d.i3d_input(video, size=32)
    assert x.shape == (3, i3d.MIN_FRAMES, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x[:, -1], x[:, 4])  # padded with the last frame
    batch = torch.stack([x, i3d.i3d_input(video[::-1].copy(), size=32)])
    with torch.no_grad():
        feats, logits = model.features(batch), model(batch)
    assert feats.shape == (2, i3d.FEATURE_DIM) and logits.shape == (2, i3d.NUM_CLASSES)
    assert torch.isfinite(feats).all() and torch.isfinite(logits).all()
    assert not torch.allclose(feats[0], feats[1])
    with pytest.raises(ValueError, match="at least 9 frames"):
        model.features(batch[:, :, :4])
    with pytest.raises(ValueError, match="uint8"):
        i3d.i3d_input(video.astype(np.float32))


def test_i3d_pytorch_i3d_state_dict_round_trip(tmp_path):
    torch.manual_seed(1)
    source = i3d.I3D()
    with torch.no_grad():  # non-trivial batch-norm statistics, as trained weights have
        for name, buf in source.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                buf.copy_(torch.rand_like(buf) + 0.5)
    # As distributed (rgb_imagenet.pt): a plain state dict without the batch counters.
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "rgb_imagenet.pt")
    loaded = i3d.load_i3d(tmp_path / "rgb_imagenet.pt")
    assert not loaded.training
    for key, value in state.items():
        assert torch.equal(loaded.state_dict()[key], value), key
    video = np.random.default_rng(2).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    source.eval()
    with torch.no_grad():
        want = source.features(i3d.i3d_input(video, size=32)[None]).double().numpy()
    assert np.allclose(i3d.i3d_features(loaded, [video], size=32), want)

    bad = dict(state)
    bad["Mixed_9z.b0.conv3d.weight"] = torch.zeros(1)
    del bad["Mixed_4c.b2b.bn.running_mean"]
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as err:
        i3d.load_i3d(tmp_path / "bad.pt")
    assert "unexpected (1): Mixed_9z.b0.conv3d.weight" in str(err.value)
    assert "missing (1): Mixed_4c.b2b.bn.running_mean" in str(err.value)
    with pytest.raises(CheckpointError, match="do not exist"):
        i3d.load_i3d(tmp_path / "nothing.pt")


# ------------------------------------------------------------------ CLIPSIM pieces
def test_clip_similarity_and_summary():
    text = torch.tensor([1.0, 0.0, 0.0])
    frames = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [-1.0, 0.0, 0.0]])
    assert clipsim.clip_similarity(frames[:1], text) == pytest.approx(1.0)
    assert clipsim.clip_similarity(frames, text) == pytest.approx(0.0)
    assert clipsim.clip_similarity(frames[:2], text) == pytest.approx(0.5)
    summary = clipsim.summarize([0.3, 0.2])
    assert summary["clipsim"] == pytest.approx(25.0) and summary["clipsim_raw"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="embeddings"):
        clipsim.clip_similarity(frames, torch.ones(4))


def test_read_captions_msrvtt_styles(tmp_path):
    path = tmp_path / "caps.json"
    path.write_text(json.dumps([{"video": "v1.mp4", "caption": "a cat"}, {"video_id": "video2", "caption": " a dog "},
                                {"video": "v1.mp4", "caption": "a cat plays"}]))
    items = clipsim.read_captions(path)
    assert [(i.uid, i.video, i.caption) for i in items] == [
        ("v1.mp4#0", "v1.mp4", "a cat"), ("video2#0", "video2", "a dog"), ("v1.mp4#1", "v1.mp4", "a cat plays")]
    assert [i.uid for i in clipsim.read_captions(path, one_per_video=True)] == ["v1.mp4#0", "video2#0"]
    path.write_text(json.dumps({"videos": [], "sentences": [{"video_id": "video7", "caption": "x", "sen_id": 1}]}))
    assert clipsim.read_captions(path)[0].uid == "video7#0"
    path.write_text(json.dumps([{"video": "v1"}]))
    with pytest.raises(ValueError, match="item 0 needs"):
        clipsim.read_captions(path)


def test_clip_without_open_clip_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # as if not installed (it may be, or not)
    with pytest.raises(ImportError, match="pip install open_clip_torch"):
        clipsim.ClipScorer.from_local(tmp_path / "w.pt")


def test_clip_scorer_with_open_clip(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32")  # random weights; nothing downloads
    torch.save(model.state_dict(), tmp_path / "clip.pt")
    scorer = clipsim.ClipScorer.from_local(tmp_path / "clip.pt", "ViT-B-32")
    frames = render(WORLD.clip("test", 0), 64)[:3]
    value = scorer.score(frames, "a red circle")
    assert -1.0 <= value <= 1.0


# ------------------------------------------------------------------ the script
def _planted(wrong: bool):
    """generate_frames stand-in: the rendered Shapes clip of the prompt (or of a recoloured one)."""
    by_caption = {canonical_caption(c): c for c in (WORLD.clip("test", i) for i in range(200))}

    def fake(pipe, text, seed, options):
        clip = by_caption[text]
        if wrong:
            used = {o.color for o in clip.objects}
            spare = [c for c in COLORS if c not in used]
            clip = dataclasses.replace(clip, objects=tuple(
                dataclasses.replace(o, color=spare[k]) for k, o in enumerate(clip.objects)))
        return render(clip, 64)
    return fake


@pytest.mark.parametrize("wrong", [False, True])
def test_planted_prompt_following(ckpt, tmp_path, monkeypatch, capsys, wrong):
    monkeypatch.setattr(generation, "generate_frames", _planted(wrong))
    monkeypatch.setattr(generation, "find_checkpoint", lambda **kw: ckpt)
    out = tmp_path / "out"
    args = ["--num-prompts", "4", "--num-heldout", "2", "--output-dir", str(out), "--save-videos", "2"]
    result = generation.main(args)  # no --checkpoint: the quick-start one (here: the tiny run)
    stdout = capsys.readouterr().out
    assert "no --checkpoint: using the quick-start checkpoint" in stdout
    expected = 0.0 if wrong else 1.0
    assert result["prompt_following"] == expected
    assert result["prompt_following_seen"] == expected and result["prompt_following_heldout"] == expected
    assert result["num_heldout"] >= 2 and result["num_prompts"] == result["num_seen"] + result["num_heldout"]
    assert result["attribute_accuracy"]["color"] == expected and result["count_accuracy"] == 1.0
    rows = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert len(rows) == result["num_prompts"] and all(r["correct"] == (not wrong) for r in rows)
    assert len(list((out / "samples").glob(f"prompts_*_{'wrong' if wrong else 'ok'}.mp4"))) == 2
    assert json.loads(stdout.strip().splitlines()[-1])["prompt_following"] == expected
    with pytest.raises(SystemExit, match="other settings"):  # a resumed run must keep its settings
        generation.main(args + ["--steps", "3"])


def test_script_end_to_end_tiny_checkpoint(ckpt, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args = ["--checkpoint", str(ckpt), "--num-prompts", "2", "--num-heldout", "0", "--steps", "2",
            "--output-dir", str(out), "--save-videos", "1", "--device", "cpu"]
    result = generation.main(args)
    stdout = capsys.readouterr().out
    last = json.loads(stdout.strip().splitlines()[-1])
    assert last == {k: json.loads(json.dumps(result.get(k))) for k in generation.HEADLINE} | {
        "checkpoint": str(ckpt)}
    assert result["num_prompts"] == 2 and 0.0 <= result["prompt_following"] <= 1.0
    assert len((out / "prompts.jsonl").read_text().splitlines()) == 2
    assert json.loads((out / "metrics.json").read_text())["num_prompts"] == 2
    assert len(list((out / "samples").glob("prompts_test-0_*.mp4"))) == 1
    # No I3D weights: no FVD, and the stand-in is labelled as not being FVD.
    assert result["fvd"] is None and "FVD needs I3D weights" in result["fvd_note"]
    assert "FVD needs I3D weights" in stdout and "NOT FVD" in stdout
    assert result["tokenizer_fd"] >= 0.0 and "NOT FVD" in result["tokenizer_fd_note"]
    assert sorted(p.name for p in (out / "features" / "prompts").iterdir()) == ["test-0.npz", "test-1.npz"]
    # A re-run resumes: nothing is generated again.
    monkeypatch.setattr(generation, "generate_frames", lambda *a: pytest.fail("regenerated a finished prompt"))
    again = generation.main(args)
    assert again["num_resumed"] == 2 and again["tokenizer_fd"] == pytest.approx(result["tokenizer_fd"])


def test_script_fvd_with_i3d_weights(ckpt, tmp_path, monkeypatch, capsys):
    torch.manual_seed(2)
    torch.save(i3d.I3D().state_dict(), tmp_path / "i3d.pt")
    monkeypatch.setattr(generation, "generate_frames", _planted(False))
    monkeypatch.setattr(generation, "I3D_SIZE", 32)  # the real 224 px is too slow for a unit test
    result = generation.main(["--checkpoint", str(ckpt), "--num-prompts", "3", "--num-heldout", "0",
                              "--output-dir", str(tmp_path / "out"), "--i3d", str(tmp_path / "i3d.pt"),
                              "--save-videos", "0", "--device", "cpu"])
    stdout = capsys.readouterr().out
    assert isinstance(result["fvd"], float) and result["fvd"] >= 0.0 and "needs" not in result["fvd_note"]
    assert "FVD needs I3D weights" not in stdout and f"FVD {result['fvd']:.2f}" in stdout
    assert result["fd_num_real"] == result["fd_num_generated"] == 3
    with np.load(tmp_path / "out" / "features" / "prompts" / "test-0.npz") as data:
        assert data["i3d"].shape == (i3d.FEATURE_DIM,) and data["tokenizer"].ndim == 1
    with pytest.raises(SystemExit, match="do not exist"):
        generation.main(["--checkpoint", str(ckpt), "--i3d", str(tmp_path / "missing.pt"),
                         "--output-dir", str(tmp_path / "o2")])
