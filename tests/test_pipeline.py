"""The user-facing API: divot.load / DivotPipeline (answer, generate_video, chat), divot.generate,
scripts/chat.py and scripts/generate.py — on a tiny random Divot-LLM, tokenizer and de-tokenizer."""
import importlib.util
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import divot
from divot.modeling import WEIGHTS_NAME, CheckpointError
from divot.tokenizer import DivotTokenizer
from divot.video_io import VideoReadError, read_clip, write_video
from llm import api
from llm import pipeline as pl
from llm import text_tokenizer as tt
from llm.chat import GeneratedVideo, array_clips
from llm.model import DivotLLM

from _llm_fixtures import make_tiny_run, write_pipeline_json

ROOT = Path(__file__).resolve().parents[1]
Q = tt.NUM_QUERY_TOKENS
SIDE = 32  # tiny de-tokenizer frame size


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny random run: llm/ (training layout + pipeline.json), tokenizer/, detokenizer/."""
    return make_tiny_run(tmp_path_factory.mktemp("divot_run"))


@pytest.fixture(scope="module")
def pipe(run_dir):
    return divot.load(run_dir / "llm", device="cpu")


def frames(n: int, seed: int = 0, h: int = 40, w: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def five_s(run_dir):
    return write_video(run_dir / "five_seconds.mp4", frames(40))  # 5 s at 8 fps


@contextmanager
def writes_video(model):
    """Make the tiny model open a video at once: every text embedding gets a huge first
    coordinate, which dominates the last hidden state, and only ``<vid>``'s LM-head row reads it."""
    emb, head = model.lm.get_input_embeddings().weight, model.base_model.lm_head.weight
    saved = emb.detach().clone(), head.detach().clone()
    with torch.no_grad():
        emb[:, 0] += 1000.0
        head[model.special_ids["<vid>"], 0] = 100.0
    try:
        yield
    finally:
        with torch.no_grad():
            emb.copy_(saved[0])
            head.copy_(saved[1])


@contextmanager
def no_model_work(monkeypatch, pipe):
    def fail(*args, **kwargs):
        raise AssertionError("a model ran before the input was checked")
    with monkeypatch.context() as m:
        m.setattr(pipe.tokenizer, "forward", fail)
        m.setattr(pipe.model, "generate_text", fail)
        m.setattr(pipe.model, "generate_video_tokens", fail)
        yield


# ---------------------------------------------------------------- answer
def test_answer_text_deterministic_by_seed(pipe, five_s):
    streamed = []
    first = pipe.answer("What happens in the video?", five_s, max_new_tokens=6, do_sample=True, seed=3,
                        stream=streamed.append)
    assert isinstance(first, str) and first
    assert "".join(streamed).strip() == first  # the stream carries the whole answer, piece by piece
    assert pipe.answer("What happens in the video?", five_s, max_new_tokens=6, do_sample=True, seed=3) == first
    others = {pipe.answer("What happens in the video?", five_s, max_new_tokens=6, do_sample=True, seed=s)
              for s in (4, 5)}
    assert others != {first}


def test_several_videos_and_long_video_clips(pipe, five_s):
    assert pipe.encode_videos(five_s).shape == (3, Q, 32)  # 5 s → three 2-s clips
    tensor = torch.rand(20, 3, 50, 60) * 2 - 1  # float [-1, 1], 2.5 s → 2 clips
    pipe.answer("Compare the videos.", [five_s, tensor, frames(10)], max_new_tokens=2)
    prompt = pipe.last_prompt
    assert prompt.num_clips == 3 + 2 + 1
    assert int(prompt.clip_mask.sum()) == 6 * Q
    text = pipe.text_tokenizer.decode(prompt.input_ids)
    assert text.count("<frame>") == 6 and text.count("<vid>") == 1 and "Compare the videos." in text


def test_array_clips_pads_spreads_and_checks():
    video = torch.arange(100, dtype=torch.float32).view(100, 1, 1, 1).expand(100, 3, 8, 8) / 100
    clips = array_clips(video, frame_size=8, max_clips=2)
    assert clips.shape == (2, 16, 3, 8, 8)
    # 7 windows, the first and the last kept; the last is padded with the final frame.
    assert clips[0, :, 0, 0, 0].tolist() == pytest.approx([i / 100 for i in range(16)])
    assert clips[1, 3, 0, 0, 0].item() == pytest.approx(99 / 100) and clips[1, 0, 0, 0, 0] == pytest.approx(0.96)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        array_clips(video * 255, 8, 2)
    with pytest.raises(ValueError, match="uint8"):
        array_clips(torch.zeros(4, 8, 8, 3), 8, 2)


# ---------------------------------------------------------------- generate_video
def test_generate_video_seeded_and_saved(pipe, tmp_path):
    video = pipe.generate_video("a red circle moves to the left", seed=0, steps=2)
    assert video.frames.dtype == np.uint8 and video.frames.shape == (16, SIDE, SIDE, 3)
    assert video.fps == 8 and video.tokens.shape == (Q, 32) and video.text == ""
    assert tt.GENERATION_INSTRUCTION.format(caption="a red circle moves to the left") in \
        pipe.text_tokenizer.decode(pipe.last_prompt.input_ids)
    again = pipe.generate_video("Generate a video of a red circle moves to the left", seed=0, steps=2)
    assert np.array_equal(again.frames, video.frames) and torch.equal(again.tokens, video.tokens)
    other = pipe.generate_video("a red circle moves to the left", seed=1, steps=2)
    assert not np.array_equal(other.frames, video.frames)
    back = read_clip(video.save(tmp_path / "out.mp4"))
    assert back.shape == (16, SIDE, SIDE, 3) and video.path == tmp_path / "out.mp4"
    assert read_clip(video.save(tmp_path / "out.gif")).shape == (16, SIDE, SIDE, 3)


# ---------------------------------------------------------------- chat
def test_chat_keeps_history_and_resets(pipe, five_s):
    pipe.reset()
    first = pipe.chat("What is in the first video?", five_s, max_new_tokens=4)
    assert isinstance(first, str)
    tensor = torch.rand(16, 3, 32, 32) * 2 - 1
    pipe.chat("And in this one?", tensor, max_new_tokens=4)
    assert [t.user for t in pipe.history] == ["What is in the first video?", "And in this one?"]
    prompt = pipe.last_prompt
    earlier = tt.encode_chat(pipe.text_tokenizer, [tt.Turn("What is in the first video?", num_clips=3, reply=first)])
    assert torch.equal(prompt.input_ids[:len(earlier.input_ids)], earlier.input_ids)  # turn 1's text and clips
    assert prompt.num_clips == 4 and int(prompt.clip_mask.sum()) == 4 * Q
    assert torch.allclose(pipe.history[0].clip_tokens, pipe.encode_videos(five_s))
    with pytest.raises(TypeError, match="stepz"):  # a misspelt video option fails even for a text reply
        pipe.chat("Hello", stepz=2)
    pipe.reset()
    assert pipe.history == ()
    pipe.chat("Hello", max_new_tokens=2)
    assert pipe.last_prompt.num_clips == 0
    assert pipe.text_tokenizer.decode(pipe.last_prompt.input_ids).count("[INST]") == 1
    pipe.reset()


def test_chat_generates_a_video_and_keeps_it(pipe, five_s):
    pipe.reset()
    pipe.chat("Describe it.", five_s, max_new_tokens=3)
    with writes_video(pipe.model):
        reply = pipe.chat("Now make a video of a blue square.", seed=0, steps=2)
    assert isinstance(reply, GeneratedVideo) and reply.frames.shape == (16, SIDE, SIDE, 3)
    assert pipe.history[1].video is reply
    assert isinstance(pipe.chat("What did you make?", max_new_tokens=3), str)
    prompt = pipe.last_prompt
    assert prompt.num_query_blocks == 1 and int(prompt.query_mask.sum()) == Q and prompt.num_clips == 3
    pipe.reset()


# ---------------------------------------------------------------- one call + cache
def test_generate_one_call_both_modes_and_cache(pipe, run_dir, five_s, tmp_path, monkeypatch):
    loads = []

    def counting_load(checkpoint, **kw):
        loads.append(checkpoint)
        return pipe
    monkeypatch.setattr(api, "load", counting_load)
    api.clear_cache()
    try:
        video = divot.generate("a red circle", checkpoint=run_dir / "llm", seed=0, steps=2, output=tmp_path / "a.mp4")
        assert isinstance(video, GeneratedVideo) and (tmp_path / "a.mp4").is_file()
        text = divot.generate("What happens?", five_s, checkpoint=run_dir / "llm", max_new_tokens=2)
        assert isinstance(text, str)
        assert isinstance(divot.generate("Hi", checkpoint=run_dir / "llm", mode="text", max_new_tokens=2), str)
        assert isinstance(divot.generate("a square", five_s, checkpoint=run_dir / "llm", mode="video", steps=1),
                          GeneratedVideo)
        assert len(loads) == 1  # one load for four calls on the same checkpoint
        assert divot.generate("Hi", pipeline=pipe, mode="text", max_new_tokens=1) is not None
        with pytest.raises(ValueError, match="mode"):
            divot.generate("x", checkpoint=run_dir / "llm", mode="audio")
    finally:
        api.clear_cache()


def test_pipeline_merges_the_lora_and_computes_the_same(run_dir):
    model = DivotLLM.from_pretrained(run_dir / "llm").eval()
    with torch.no_grad():  # a LoRA that changes the output, so an unmerged or wrong fold shows
        for name, p in model.lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
        ids = torch.tensor([[1, 100, 200, 300, 400]])
        before = model.base_model(input_ids=ids).logits
        pipe = pl.DivotPipeline(model, DivotTokenizer.from_pretrained(run_dir / "tokenizer"), device="cpu")
        adapted = [m for m in model.lm.modules() if hasattr(m, "lora_A") and hasattr(m, "merged")]
        assert adapted and all(m.merged for m in adapted)
        after = pipe.model.base_model(input_ids=ids).logits
        model.lm.unmerge_adapter()
        restored = model.base_model(input_ids=ids).logits
        with model.lm.disable_adapter():  # the base alone: the LoRA must matter, or the check is empty
            base_only = model.base_model(input_ids=ids).logits
    tol = 1e-4 * before.abs().max()
    assert (before - after).abs().max() < tol and (before - restored).abs().max() < tol
    assert (before - base_only).abs().max() > 100 * tol


def test_divot_exposes_the_api_lazily():
    code = "import sys, divot; assert 'llm' not in sys.modules and 'torch' not in sys.modules"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert divot.DivotPipeline is pl.DivotPipeline and divot.generate is api.generate


# ---------------------------------------------------------------- errors
def test_missing_and_incompatible_checkpoints(run_dir, tmp_path):
    with pytest.raises(CheckpointError, match="(?s)does not exist.*train_llm.py"):
        divot.load(tmp_path / "nope", device="cpu")
    with pytest.raises(CheckpointError, match="(?s)no Divot-LLM checkpoint found.*train_llm.py --stage pretrain"):
        pl.find_checkpoint(roots=[tmp_path])
    for stage in ("llm_pretrain", "llm_sft_gen"):
        (tmp_path / "runs" / stage / "final").mkdir(parents=True)
    assert pl.find_checkpoint(roots=[tmp_path]) == (tmp_path / "runs/llm_sft_gen/final").resolve()
    (tmp_path / "runs" / "llm_sft_comp" / "final").mkdir(parents=True)
    assert pl.find_checkpoint(roots=[tmp_path]) == (tmp_path / "runs/llm_sft_comp/final").resolve()
    video_first = pl.find_checkpoint(roots=[tmp_path], candidates=pl.GENERATION_CHECKPOINTS)
    assert video_first == (tmp_path / "runs/llm_sft_gen/final").resolve()
    bad = tmp_path / "bad"
    shutil.copytree(run_dir / "llm", bad)
    (bad / "pipeline.json").unlink()
    with pytest.raises(CheckpointError, match="pipeline.json"):
        divot.load(bad, device="cpu")
    write_pipeline_json(bad, run_dir / "tokenizer", run_dir / "detokenizer")
    weights = bad / "input_projector" / WEIGHTS_NAME
    save_file({**load_file(str(weights)), "surplus.weight": torch.zeros(1)}, str(weights))
    with pytest.raises(CheckpointError, match="unexpected.*surplus.weight"):
        divot.load(bad, device="cpu")


def test_missing_detokenizer_fails_only_for_video(run_dir, tmp_path, five_s):
    ckpt = tmp_path / "llm"
    shutil.copytree(run_dir / "llm", ckpt)
    write_pipeline_json(ckpt, run_dir / "tokenizer", tmp_path / "gone_detokenizer")
    pipe = divot.load(ckpt, device="cpu")
    assert isinstance(pipe.answer("What happens?", five_s, max_new_tokens=2), str)
    with pytest.raises(CheckpointError, match="gone_detokenizer"):
        pipe.generate_video("a red circle", steps=1)


def test_corrupt_video_named_before_model_work(pipe, five_s, tmp_path, monkeypatch):
    broken = tmp_path / "broken_clip.mp4"
    broken.write_bytes(np.random.default_rng(0).bytes(4096))
    with no_model_work(monkeypatch, pipe), pytest.raises(VideoReadError, match="broken_clip.mp4") as info:
        pipe.answer("What happens?", [five_s, broken])
    assert info.value.path == str(broken)
    with no_model_work(monkeypatch, pipe), pytest.raises(VideoReadError, match="missing.mp4"):
        pipe.chat("What happens?", tmp_path / "missing.mp4")
    assert pipe.history == ()


def test_too_long_prompt_says_by_how_much(pipe, monkeypatch):
    question = "word " * 2100
    length = len(tt.encode_chat(pipe.text_tokenizer, [tt.Turn(question.strip() + " x")]).input_ids)
    assert length > 2048
    with no_model_work(monkeypatch, pipe), pytest.raises(pl.PromptTooLongError) as info:
        pipe.answer(question.strip() + " x")
    assert f"{length + 1 - 2048} more than the model's context of 2048" in str(info.value)


# ---------------------------------------------------------------- scripts
def test_chat_script_with_piped_stdin(run_dir, five_s, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    lines = f"What happens in the video?\n/video {five_s}\nAnd in this one?\n"
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "chat.py"), "--checkpoint", str(run_dir / "llm"),
                          "--video", str(five_s), "--max-new-tokens", "3", "--out-dir", str(tmp_path)],
                         input=lines, capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("divot> ") == 2 and "you> And in this one?" in out.stdout
    assert f"[{five_s} goes with your next message]" in out.stdout and out.stdout.rstrip().endswith("bye")


def test_generate_script_writes_file(run_dir, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("generate_script", ROOT / "scripts" / "generate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "red.mp4"
    assert script.main(["a red circle moves to the left", "-o", str(out), "--checkpoint", str(run_dir / "llm"),
                        "--steps", "2", "--seed", "2", "--device", "cpu", "--gif"]) == 0
    assert read_clip(tmp_path / "red.gif").shape == (16, SIDE, SIDE, 3)
    assert f"wrote {tmp_path / 'red.gif'}" in capsys.readouterr().out
    assert script.main(["x", "--checkpoint", str(tmp_path / "none"), "--device", "cpu"]) == 1
