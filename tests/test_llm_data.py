"""Divot-LLM training data: sources, clip features + cache script, and the batch collator."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from divot.presets import tokenizer_config
from divot.shapes import ShapesWorld, render
from divot.tokenizer import DivotTokenizer
from divot.video_io import read_clips, to_tensor, write_video
from llm import text_tokenizer as tt
from llm.collate import LLMCollator, pad_token_id
from llm.data_sources import (
    CAPTION_PROMPTS,
    CaptionJsonlSource,
    ConversationSource,
    MixtureSource,
    ShapesCaptionSource,
    ShapesGenerationSource,
    ShapesQASource,
    format_mc_answer,
    format_multiple_choice,
    make_sample,
)
from llm.features import ClipFeatures, FeatureCacheMiss, VideoRef

REPO = Path(__file__).resolve().parents[1]
Q = tt.NUM_QUERY_TOKENS
CONTRACT = {"input_ids", "attention_mask", "labels", "clip_mask", "clip_tokens", "query_mask",
            "target_tokens", "task", "num_corrupt", "corrupt_paths"}


@pytest.fixture(scope="module")
def ttok():
    return tt.load_text_tokenizer()


def _tiny_tokenizer(seed: int) -> DivotTokenizer:
    torch.manual_seed(seed)
    return DivotTokenizer(tokenizer_config("tiny")).eval()


@pytest.fixture(scope="module")
def divot_tok():
    return _tiny_tokenizer(0)


@pytest.fixture(scope="module")
def features(divot_tok):
    return ClipFeatures(divot_tok, batch_size=4)


@torch.no_grad()
def _encode_frames(tok, clips) -> torch.Tensor:
    """Reference tokens: the tokenizer run directly on uint8 (f, s, s, 3) clips."""
    return tok.encode(torch.stack([to_tensor(c) for c in clips]))


def _shapes_frames(ref: VideoRef) -> np.ndarray:
    seed, split, index = ref.shapes
    return render(ShapesWorld(seed=seed).clip(split, index), 32)


def _moving_video(path: Path, seconds: float) -> Path:
    """A Shapes-like clip of ``seconds`` at 8 fps, 32 px, distinct content per second."""
    world = ShapesWorld(seed=3, size=32)
    frames = np.concatenate([render(world.clip("train", i), 32) for i in range(4)])
    return write_video(path, frames[: int(seconds * 8)], fps=8)


# ---------------------------------------------------------------------- prompt formats
def test_multiple_choice_prompt_and_answer():
    text = format_multiple_choice("What colour is the circle?", ["red", "blue", "green", "white", "purple"])
    assert text == ("What colour is the circle?\nA. red\nB. blue\nC. green\nD. white\nE. purple\n"
                    "Answer with the text of the correct option.")
    assert format_mc_answer(["red", "blue", "green"], 2) == "green"
    with pytest.raises(ValueError, match="outside"):
        format_mc_answer(["red", "blue"], 2)


# ---------------------------------------------------------------------- Shapes sources
def test_shapes_sources_give_well_formed_deterministic_samples(ttok):
    world = ShapesWorld(seed=5)
    cap, gen, qa = (cls("train", length=20, seed=5) for cls in
                    (ShapesCaptionSource, ShapesGenerationSource, ShapesQASource))
    prompts = set()
    for i in range(8):
        for source in (cap, gen, qa):
            s = source[i]
            assert set(s) == {"task", "turns", "videos", "target_video"}
            assert s == type(source)("train", length=20, seed=5)[i]  # deterministic by index
        c = cap[i]
        (turn,) = c["turns"]
        assert c["task"] == "caption" and turn.user in CAPTION_PROMPTS and turn.num_clips == 1
        assert turn.reply == world.caption("train", i)
        assert [r.key for r in c["videos"]] == [f"shapes:5/train/{i}"] and c["target_video"] is None
        prompts.add(turn.user)
        g = gen[i]
        caption = world.caption("train", i)
        assert g["task"] == "generate" and g["videos"] == [] and g["target_video"].shapes == (5, "train", i)
        assert g["turns"] == [tt.Turn(f"Generate a video of {caption}", reply_video=True)]
        assert torch.equal(tt.encode_chat(ttok, g["turns"]).input_ids,
                           tt.encode_generation(ttok, caption).input_ids)
        q, expect = qa[i], world.question("train", i)
        (turn,) = q["turns"]
        assert q["task"] == "qa" and turn.num_clips == 1
        assert turn.user == format_multiple_choice(expect["question"], expect["options"])
        assert turn.reply == expect["options"][expect["answer"]]
    assert len(prompts) > 2  # phrasings vary across items
    with pytest.raises(IndexError):
        cap[20]


# ---------------------------------------------------------------------- collator
def _supervised(batch, row):
    return batch["input_ids"][row][batch["labels"][row] != tt.IGNORE_INDEX].tolist()


def test_batch_follows_the_contract(ttok, divot_tok, features):
    cap, gen, qa = (cls("train", length=10, seed=0) for cls in
                    (ShapesCaptionSource, ShapesGenerationSource, ShapesQASource))
    two = [VideoRef.shapes_clip(0, "train", 7), VideoRef.shapes_clip(0, "train", 8)]
    samples = [cap[1], gen[2], qa[3], make_sample("caption", [tt.Turn("Compare them.", 2, "same")], two)]
    batch = LLMCollator(ttok, features)(samples)
    assert set(batch) == CONTRACT
    b, length = batch["input_ids"].shape
    assert b == 4 and batch["task"] == ["caption", "generate", "qa", "caption"]
    for name in ("input_ids", "attention_mask", "labels"):
        assert batch[name].dtype == torch.long and batch[name].shape == (b, length)
    for name in ("clip_mask", "query_mask"):
        assert batch[name].dtype == torch.bool and batch[name].shape == (b, length)
    lengths = [len(tt.encode_chat(ttok, s["turns"]).input_ids) for s in samples]
    assert batch["attention_mask"].sum(1).tolist() == lengths and max(lengths) == length
    pad = batch["attention_mask"] == 0
    assert (batch["input_ids"][pad] == pad_token_id(ttok)).all() and (batch["labels"][pad] == -100).all()
    assert all(batch["attention_mask"][i, :n].all() for i, n in enumerate(lengths))  # right padding
    assert batch["clip_mask"].sum(1).tolist() == [Q, 0, Q, 2 * Q]
    assert batch["query_mask"].sum(1).tolist() == [0, Q, 0, 0]
    # Labels only on the replies (never on clips or queries).
    assert not (batch["labels"][batch["clip_mask"] | batch["query_mask"]] != -100).any()
    for row, reply in ((0, samples[0]["turns"][0].reply), (2, samples[2]["turns"][0].reply), (3, "same")):
        assert ttok.decode(_supervised(batch, row)) == reply + "</s>"
    ids = tt.special_token_ids(ttok)
    assert _supervised(batch, 1) == [ids["<vid>"], ids["<frame>"], ids["</vid>"]]
    # Clip tokens in row-major order of clip_mask; targets in order of query blocks.
    refs = [samples[0]["videos"][0], samples[2]["videos"][0], *two]
    assert batch["clip_tokens"].shape == (4, Q, 32) and batch["clip_tokens"].dtype == torch.float32
    expect = _encode_frames(divot_tok, [_shapes_frames(r) for r in refs])
    torch.testing.assert_close(batch["clip_tokens"], expect, atol=1e-5, rtol=1e-4)
    target = _encode_frames(divot_tok, [_shapes_frames(samples[1]["target_video"])])
    torch.testing.assert_close(batch["target_tokens"], target, atol=1e-5, rtol=1e-4)
    assert batch["num_corrupt"] == 0 and batch["corrupt_paths"] == []


def test_too_long_sequence_names_the_sample(ttok, features):
    sample = ShapesCaptionSource(length=2)[0]
    with pytest.raises(ValueError, match=r"caption sample .* longer than max_length 40"):
        LLMCollator(ttok, features, max_length=40)([sample])
    bad = make_sample("caption", [tt.Turn("Two clips?", 2, "no")], [VideoRef.shapes_clip(0, "train", 1)])
    with pytest.raises(ValueError, match="2 clips .* 1 videos"):
        LLMCollator(ttok, features)([bad])


# ---------------------------------------------------------------------- mixture
def test_mixture_ratios_and_determinism():
    sources = {"caption": ShapesCaptionSource(length=50), "generate": ShapesGenerationSource(length=50),
               "qa": ShapesQASource(length=50)}
    ratios = {"caption": 2.0, "generate": 1.0, "qa": 1.0}
    mix = MixtureSource(sources, ratios, length=400, seed=3)
    picks = [mix.locate(i) for i in range(400)]
    for name, share in (("caption", 0.5), ("generate", 0.25), ("qa", 0.25)):
        frac = sum(p[0] == name for p in picks) / 400
        assert abs(frac - share) < 0.07, (name, frac)
    assert len({p[1] for p in picks if p[0] == "caption"}) > 30  # indices spread over the source
    again = MixtureSource(sources, ratios, length=400, seed=3)
    assert [again.locate(i) for i in reversed(range(400))][::-1] == picks  # any order, same items
    assert mix[17] == again[17] and mix[17]["task"] == picks[17][0]
    assert [MixtureSource(sources, ratios, 400, seed=4).locate(i) for i in range(400)] != picks
    with pytest.raises(ValueError, match=r"missing \['qa'\]"):
        MixtureSource(sources, {"caption": 1.0, "generate": 1.0}, length=10)


# ---------------------------------------------------------------------- video files
def test_multi_clip_videos_become_consecutive_clips(tmp_path, ttok, divot_tok, features):
    long = _moving_video(tmp_path / "v" / "five.mp4", 5.0)
    _moving_video(tmp_path / "v" / "one.mp4", 1.0)
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text(json.dumps({"video": "v/five.mp4", "caption": "five seconds"}) + "\n"
                     + json.dumps({"video": "v/one.mp4", "caption": "one second"}) + "\n")
    source = CaptionJsonlSource(jsonl, tasks=("caption", "generate"), max_clips=4)
    assert len(source) == 4
    five, five_gen, one = source[0], source[1], source[2]
    # read_clips cuts 5 s into windows at 0, 2 and 4 s (the last one padded): three clips.
    assert five["turns"][0].num_clips == 3 and five["turns"][0].reply == "five seconds"
    assert [r.clip for r in five["videos"]] == [0, 1, 2] and len({r.key for r in five["videos"]}) == 3
    assert one["turns"][0].num_clips == 1
    assert five_gen["task"] == "generate" and five_gen["target_video"].clip == 0
    capped = CaptionJsonlSource(jsonl, max_clips=2)[0]
    assert capped["turns"][0].num_clips == 2 and len(capped["videos"]) == 2
    # Features follow the clips in order; the batch's clip_mask counts 64 per clip.
    expect = _encode_frames(divot_tok, read_clips(long, max_clips=4, size=32))
    torch.testing.assert_close(features(five["videos"]), expect, atol=1e-5, rtol=1e-4)
    batch = LLMCollator(ttok, features)([five, five_gen, one])
    assert batch["clip_mask"].sum(1).tolist() == [3 * Q, 0, Q]
    assert batch["clip_tokens"].shape == (4, Q, 32) and batch["target_tokens"].shape == (1, Q, 32)
    torch.testing.assert_close(batch["target_tokens"][0], expect[0], atol=1e-5, rtol=1e-4)


def test_conversation_source_turns_and_marker_errors(tmp_path, ttok, features):
    _moving_video(tmp_path / "clip.mp4", 3.0)
    talk = [{"from": "human", "value": "<video>\nWhat colour is the shape?"}, {"from": "gpt", "value": "red"},
            {"from": "human", "value": "And what shape is it?"}, {"from": "gpt", "value": "a circle"}]
    path = tmp_path / "chat.json"
    path.write_text(json.dumps([{"video": "clip.mp4", "conversations": talk},
                                {"conversations": talk[2:]}]))
    source = ConversationSource(path)
    sample = source[0]
    assert sample["task"] == "chat" and len(sample["videos"]) == 2  # 3 s → 2 clips
    assert sample["turns"] == [tt.Turn("What colour is the shape?", 2, "red"),
                               tt.Turn("And what shape is it?", 0, "a circle")]
    assert source[1]["videos"] == [] and source[1]["turns"] == [tt.Turn("And what shape is it?", 0, "a circle")]
    batch = LLMCollator(ttok, features)([sample])
    assert batch["clip_mask"].sum().item() == 2 * Q and batch["clip_tokens"].shape[0] == 2
    assert ttok.decode(_supervised(batch, 0)) == "red</s>a circle</s>"

    def bad(record, match):
        path.write_text(json.dumps([record]))
        with pytest.raises(ValueError, match=match):
            ConversationSource(path)

    plain = [{"from": "human", "value": "What colour?"}, {"from": "gpt", "value": "red"}]
    bad({"video": "clip.mp4", "conversations": plain}, "record 0: no <video> marker for 1 video")
    two = [{"from": "human", "value": "<video> <video> Same?"}, {"from": "gpt", "value": "yes"}]
    bad({"video": "clip.mp4", "conversations": two}, "2 <video> marker.* for 1 video")
    bad({"conversations": talk[:2]}, "1 <video> marker.* for 0 video")
    bad({"video": "clip.mp4", "conversations": talk[:2] + [{"from": "gpt", "value": "<video>"}] * 2},
        "human then a gpt")
    bad({"video": "clip.mp4", "conversations": talk[:1]}, "pairs")


def test_corrupt_videos_are_dropped_and_counted(tmp_path, ttok, features):
    _moving_video(tmp_path / "good.mp4", 2.0)
    _moving_video(tmp_path / "late.mp4", 2.0)
    (tmp_path / "broken.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    jsonl = tmp_path / "list.jsonl"
    jsonl.write_text("".join(json.dumps({"video": v, "caption": c}) + "\n" for v, c in
                             (("good.mp4", "good"), ("broken.mp4", "broken"), ("late.mp4", "late"))))
    source = CaptionJsonlSource(jsonl)
    good, broken, late = source[0], source[1], source[2]
    assert broken == {"corrupt": str(tmp_path / "broken.mp4")}
    # late.mp4 probed fine, then became unreadable before its pixels were read.
    (tmp_path / "late.mp4").write_bytes(np.random.default_rng(1).bytes(4096))
    collate = LLMCollator(ttok, features)
    batch = collate([good, broken, late])
    assert batch["input_ids"].shape[0] == 1 and batch["task"] == ["caption"]
    assert batch["num_corrupt"] == 2
    assert batch["corrupt_paths"] == [str(tmp_path / "broken.mp4"), str(tmp_path / "late.mp4")]
    assert batch["clip_tokens"].shape == (1, Q, 32) and batch["clip_mask"].sum().item() == Q
    empty = collate([broken])
    assert empty["input_ids"].shape == (0, 0) and empty["clip_tokens"].shape == (0, Q, 32)
    assert empty["num_corrupt"] == 1 and empty["task"] == []


# ---------------------------------------------------------------------- feature cache
def _load_script():
    spec = importlib.util.spec_from_file_location("cache_features", REPO / "scripts" / "cache_features.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cache_script_resumes_and_matches_fresh_features(tmp_path, capsys, divot_tok, features):
    tok_dir, cache = tmp_path / "run" / "tokenizer", tmp_path / "cache"
    divot_tok.save_pretrained(tok_dir)
    script = _load_script()
    args = ["--tokenizer", str(tok_dir), "--out", str(cache), "--shapes-split", "train",
            "--batch-size", "4", "--shard-size", "4", "--num"]
    assert script.main(args + ["3"]) == 0  # an "interrupted" first run
    assert "3 to compute" in capsys.readouterr().out
    assert script.main(args + ["6"]) == 0
    assert "3 already cached, 3 to compute" in capsys.readouterr().out
    shards = sorted(cache.glob("shard-*.safetensors"))
    stamps = [p.stat().st_mtime_ns for p in shards]
    assert len(shards) == 2 and json.loads((cache / "index.json").read_text())["frame_size"] == 32
    assert script.main(args + ["6"]) == 0
    out = capsys.readouterr().out
    assert "6 already cached, 0 to compute" in out and "wrote 0 clips" in out
    assert sorted(cache.glob("shard-*.safetensors")) == shards
    assert [p.stat().st_mtime_ns for p in shards] == stamps

    refs = [VideoRef.shapes_clip(0, "train", i) for i in (5, 0, 3)]
    cached = ClipFeatures(None, cache)
    assert (cached.num_tokens, cached.token_dim, cached.frame_size) == (Q, 32, 32)
    torch.testing.assert_close(cached(refs), features(refs), atol=1e-5, rtol=1e-4)
    with pytest.raises(FeatureCacheMiss, match="shapes:0/train/99.*cache_features.py"):
        cached([refs[0], VideoRef.shapes_clip(0, "train", 99)])
    with pytest.raises(ValueError, match="different tokenizer"):
        ClipFeatures(_tiny_tokenizer(1), cache)
    # Online write-back: a new clip lands in a new shard that a fresh reader finds.
    writer = ClipFeatures(divot_tok, cache, write=True)
    fresh = writer([VideoRef.shapes_clip(0, "train", 99)])
    writer.flush()
    torch.testing.assert_close(ClipFeatures(None, cache)([VideoRef.shapes_clip(0, "train", 99)]), fresh)
    with pytest.raises(FileNotFoundError, match="no feature cache"):
        ClipFeatures(None, tmp_path / "nowhere")
