"""Comprehension evaluation: EgoSchema (both layouts), generic multiple choice and open-ended QA
on a tiny random Divot-LLM — parsing, scoring, bookkeeping, resume, bad videos, the scripts."""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import divot
from divot.shapes import QUESTION_KINDS, ShapesWorld
from divot.video_io import write_video
from eval import egoschema, mc_core, multiple_choice, open_qa
from eval.qa_io import (MCQuestion, ResultLog, check_settings, read_egoschema_release, read_lmms_egoschema,
                        read_mc_json, read_open_qa_json)
from llm.data_sources import MC_INSTRUCTION, format_mc_answer, format_multiple_choice
from llm.text_tokenizer import IGNORE_INDEX, encode_comprehension

from _llm_fixtures import make_tiny_run

OPTIONS = ("red", "blue", "green", "yellow", "purple")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("eval_run"), detokenizer=False)


@pytest.fixture(scope="module")
def pipe(run_dir):
    return divot.load(run_dir / "llm", device="cpu", max_clips=2)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    frames = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    return str(write_video(tmp_path_factory.mktemp("videos") / "clip.mp4", frames))  # 2 s → one clip


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    """Four Shapes questions in the release layout, written by the script's own code."""
    folder, written = egoschema.ensure_shapes_egoschema(tmp_path_factory.mktemp("shapes"), num_questions=4)
    assert written and egoschema.ensure_shapes_egoschema(folder.parent, 4) == (folder, False)
    return folder


def questions(video, n=10):
    return [MCQuestion(f"q{i}", f"Question {i}?", OPTIONS, i % 5, video) for i in range(n)]


def counting(monkeypatch, scorer=None):
    """Wrap mc_core.option_scores (or replace it by ``scorer``); returns the list of request counts."""
    calls, real = [], mc_core.option_scores

    def wrapped(model, requests, batch_size=8):
        calls.append(len(requests))
        return (scorer or real)(model, requests, batch_size)
    monkeypatch.setattr(mc_core, "option_scores", wrapped)
    return calls


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


# ---------------------------------------------------------------- layouts
def test_release_layout_from_shapes_script(shapes_dir):
    qs = read_egoschema_release(shapes_dir)
    assert len(qs) == 4 and all(len(q.options) == 5 and 0 <= q.answer < 5 for q in qs)
    assert all(Path(q.video).is_file() and Path(q.video).name == f"{q.uid}.mp4" for q in qs)
    assert {"kind", "heldout", "num_objects"} <= set(qs[0].extra)
    world = ShapesWorld(seed=0)
    assert [q.extra["num_objects"] for q in qs] == [len(world.clip("test", i).objects) for i in range(4)]
    raw = json.loads((shapes_dir / "questions.json").read_text())
    assert qs[1].question == raw[1]["question"] and qs[1].options[2] == raw[1]["option 2"]


def test_release_layout_unknown_answers_and_errors(tmp_path):
    recs = [{"q_uid": u, "question": "Q?", **{f"option {i}": f"o{i}" for i in range(5)}, "google_drive_id": "x"}
            for u in ("a", "b")]
    (tmp_path / "questions.json").write_text(json.dumps(recs))
    (tmp_path / "subset_answers.json").write_text(json.dumps({"b": 3}))
    qs = read_egoschema_release(tmp_path)
    assert [q.answer for q in qs] == [None, 3] and qs[0].video == str(tmp_path / "videos" / "a.mp4")
    del recs[1]["option 4"]
    (tmp_path / "questions.json").write_text(json.dumps(recs))
    with pytest.raises(ValueError, match=r"item 1: missing keys \['option 4'\]"):
        read_egoschema_release(tmp_path)
    (tmp_path / "questions.json").write_text(json.dumps(recs[:1]))
    (tmp_path / "subset_answers.json").write_text(json.dumps({"a": 7}))
    with pytest.raises(ValueError, match="answer 7"):
        read_egoschema_release(tmp_path)


def test_lmms_layout_json_and_jsonl(tmp_path):
    rows = [{"question_idx": i, "question": f"Q{i}?", "video_idx": f"v{i}",
             "option": [f"{'ABCDE'[j]}. text {i}.{j}" for j in range(5)], "answer": ans}
            for i, ans in enumerate([3, "2", "", "C", None])]
    (tmp_path / "Subset").mkdir()
    (tmp_path / "videos").mkdir()
    (tmp_path / "Subset" / "test.json").write_text(json.dumps(rows))
    qs, layout, source = egoschema.load_questions(tmp_path)
    assert layout == "lmms-eval" and source == tmp_path / "Subset" / "test.json"
    assert [q.answer for q in qs] == [3, 2, None, 2, None]
    assert qs[0].options[4] == "text 0.4" and qs[0].uid == "v0" and qs[0].extra == {"question_idx": 0}
    assert qs[1].video == str(tmp_path / "videos" / "v1.mp4")  # videos/ one level above the file
    (tmp_path / "MC").mkdir()
    (tmp_path / "MC" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="several question files.*--questions"):
        egoschema.load_questions(tmp_path)
    again, _, _ = egoschema.load_questions(tmp_path, "MC/test.jsonl")
    assert again == qs
    rows[0]["option"] = rows[0]["option"][:1]
    (tmp_path / "MC" / "test.jsonl").write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(ValueError, match="row 0: 'options' must be a list of 2 to 5"):
        read_lmms_egoschema(tmp_path / "MC" / "test.jsonl")


def test_lmms_layout_parquet(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")  # not installed in the dev environment: JSON is tested above
    import pyarrow as pa
    rows = [{"question_idx": "0", "question": "Q?", "video_idx": "v0",
             "option": [f"{c}. o{c}" for c in "ABCDE"], "answer": "4"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test.parquet")
    (q,) = read_lmms_egoschema(tmp_path / "test.parquet")
    assert q.answer == 4 and q.options[0] == "oA"


def test_mc_and_open_json(tmp_path, video):
    data = [{"video": "clip.mp4", "question": "Q?", "options": ["x", "y", "z"], "answer": 2, "id": "k"},
            {"video": video, "question": "R?", "options": ["x", "y"]}]
    (tmp_path / "mc.json").write_text(json.dumps(data))
    a, b = read_mc_json(tmp_path / "mc.json")
    assert (a.uid, a.answer, a.video, b.uid, b.answer) == ("k", 2, str(tmp_path / "clip.mp4"), "1", None)
    data[1]["answer"] = 2
    (tmp_path / "mc.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="item 1: answer 2 is not an option index 0–1"):
        read_mc_json(tmp_path / "mc.json")
    (tmp_path / "qa.json").write_text(json.dumps([{"video": "a.mp4", "question": "Q", "answer": "A"}] * 2))
    assert read_open_qa_json(tmp_path / "qa.json", video_root="/v")[1].video == "/v/a.mp4"
    (tmp_path / "qa.json").write_text(json.dumps([{"video": "a.mp4", "question": "Q", "answer": "A", "id": 1}] * 2))
    with pytest.raises(ValueError, match="duplicate ids"):
        read_open_qa_json(tmp_path / "qa.json")


# ---------------------------------------------------------------- parser
@pytest.mark.parametrize("text, expected", [
    ("C", 2), ("C.", 2), ("(C)", 2), ("C)", 2), ("Answer: C", 2), ("answer:(B)", 1), (" D. yellow", 3),
    ("C. green", 2), ("green", 2), ("Green.", 2), ("(E) purple", 4),
    ("C. blue", None),        # letter and text name different options
    ("C. greenish", 2),       # the letter names C, the text names nothing
    ("F", None), ("", None), ("c", None),  # no such option / nothing / lower case is no letter form
    ("A red circle", None),   # a letter then a space is no letter form, and no option reads so
    ("B or C", None), ("I think it is blue", None),
])
def test_parse_choice_forms(text, expected):
    assert mc_core.parse_choice(text, OPTIONS) == expected


def test_parse_choice_letter_beyond_options_and_duplicate_texts():
    assert mc_core.parse_choice("D", ("a", "b", "c")) is None
    assert mc_core.parse_choice("same", ("same", "Same", "other")) is None  # text names two options
    assert mc_core.parse_choice("B. same", ("same", "Same", "other")) == 1


# ---------------------------------------------------------------- likelihood
def test_likelihood_equals_hand_computation(pipe):
    model = pipe.model
    torch.manual_seed(1)
    clips = [torch.randn(1, 64, 32), torch.randn(2, 64, 32)]
    prompt = format_multiple_choice("What moves?", ["a circle", "two small squares", "x"])
    requests = [mc_core.ScoreRequest(prompt, format_mc_answer(["a circle", "two small squares", "x"], i), c)
                for c in clips for i in range(3)]
    got = mc_core.option_scores(model, requests, batch_size=4)  # batches mixing lengths and clip counts
    expected = []
    for r in requests:
        enc = encode_comprehension(model.text_tokenizer, r.prompt, r.answer, r.clip_tokens.shape[0])
        with torch.no_grad():
            logits = model(enc.input_ids[None], clip_mask=enc.clip_mask[None], clip_tokens=r.clip_tokens).logits[0]
        logp = torch.log_softmax(logits.double(), -1)
        positions = [t for t in range(len(enc.labels)) if enc.labels[t] != IGNORE_INDEX]
        assert enc.input_ids[positions[-1]] == model.special_ids["eos"]  # </s> is scored
        assert len(positions) == len(model.text_tokenizer.encode(r.answer, add_special_tokens=False)) + 1
        expected.append(sum(logp[t - 1, enc.input_ids[t]].item() for t in positions) / len(positions))
    assert got == pytest.approx(expected, abs=1e-4)
    assert mc_core.option_scores(model, requests, batch_size=1) == pytest.approx(got, abs=1e-4)
    assert mc_core.pick([0.5, 0.7, 0.7, 0.1]) == 1 and mc_core.pick([-1.0] * 5) == 0  # ties → lowest


def test_accuracy_interval():
    acc = mc_core.accuracy([True] * 7 + [False] * 3)
    half = 1.96 * math.sqrt(0.7 * 0.3 * 10 / 9) / math.sqrt(10)  # unbiased std of 0/1 values
    assert acc["accuracy"] == pytest.approx(0.7) and acc["accuracy_ci95"] == pytest.approx(half)
    assert acc["accuracy_interval"] == pytest.approx([0.7 - half, 0.7 + half])
    assert mc_core.accuracy([True, True])["accuracy_interval"] == [1.0, 1.0]
    assert mc_core.accuracy([True])["accuracy_ci95"] is None and mc_core.accuracy([])["accuracy"] is None


# ---------------------------------------------------------------- bookkeeping
def test_cheating_scorer_is_perfect_and_constant_scorer_is_chance(pipe, video, tmp_path, monkeypatch):
    qs = questions(video)
    truth = {(format_multiple_choice(q.question, q.options), format_mc_answer(q.options, q.answer)) for q in qs}
    counting(monkeypatch, lambda m, reqs, b: [float((r.prompt, r.answer) in truth) for r in reqs])
    rows, metrics, _ = mc_core.evaluate(pipe, qs, tmp_path / "cheat", batch_size=5)
    assert metrics["accuracy"] == 1.0 and metrics["num_correct"] == 10 and all(r["correct"] for r in rows)
    counting(monkeypatch, lambda m, reqs, b: [0.0] * len(reqs))
    rows, metrics, _ = mc_core.evaluate(pipe, qs, tmp_path / "constant", batch_size=5)
    assert [r["pred"] for r in rows] == [0] * 10  # all tied → A
    assert metrics["accuracy"] == pytest.approx(0.2) and metrics["num_scored"] == 10


def test_text_only_control_asks_without_clips(pipe, video, tmp_path, monkeypatch):
    seen = []
    counting(monkeypatch, lambda m, reqs, b: seen.extend(r.clip_tokens.shape[0] for r in reqs) or [0.0] * len(reqs))
    rows, _, _ = mc_core.evaluate(pipe, questions(video)[:2], tmp_path / "text", batch_size=5, text_only=True)
    assert seen == [0] * 10 and all(r["status"] == "ok" for r in rows)
    assert json.loads((tmp_path / "text" / "settings.json").read_text())["text_only"] is True
    # The same question with its video is a different setting: a resumed run must not mix them.
    with pytest.raises(ValueError, match="text_only"):
        mc_core.evaluate(pipe, questions(video)[:2], tmp_path / "text", batch_size=5)


def test_resume_skips_done_questions(pipe, video, tmp_path, monkeypatch):
    qs, out = questions(video), tmp_path / "run"
    calls = counting(monkeypatch)
    first, _, resumed = mc_core.evaluate(pipe, qs[:4], out, batch_size=10)
    assert resumed == 0 and sum(calls) == 4 * 5
    calls.clear()
    rows, metrics, resumed = mc_core.evaluate(pipe, qs, out, batch_size=10)
    assert resumed == 4 and sum(calls) == 6 * 5 and rows[:4] == first
    assert metrics["num_questions"] == 10 and len(ResultLog(out / "results.jsonl").load()) == 10
    calls.clear()
    with open(out / "results.jsonl", "a") as f:
        f.write('{"uid": "q9", "sta')  # a write cut short by a crash
    assert mc_core.evaluate(pipe, qs, out)[2] == 10 and calls == []
    with pytest.raises(ValueError, match="other settings.*max_clips: 2 → 1"):
        check_settings(out / "settings.json", {**json.loads((out / "settings.json").read_text()), "max_clips": 1})
    # A checkpoint retrained in the same folder has other weights: its answers are not resumed.
    weight = pipe.model.input_projector.proj[0].weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.add_(1e-3)
        with pytest.raises(ValueError, match="other settings.*weights"):
            mc_core.evaluate(pipe, qs, out)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert mc_core.evaluate(pipe, qs, out)[2] == 10


def test_generate_reply_matches_pipeline_answer(pipe, video):
    prompt = format_multiple_choice("What moves?", OPTIONS)
    reply = mc_core.generate_reply(pipe.model, prompt, pipe.encode_videos(video), max_new_tokens=4)
    assert isinstance(reply, str) and reply == pipe.answer(prompt, video, max_new_tokens=4)


def test_mc_generation_mode_rows(pipe, video, tmp_path, monkeypatch):
    replies = iter(["A. red", "the sky", "Answer: (E)"])
    monkeypatch.setattr(mc_core, "generate_reply", lambda *a, **k: next(replies))
    rows, metrics, _ = mc_core.evaluate(pipe, questions(video, 3), tmp_path, mode="generate")
    assert [r["pred"] for r in rows] == [0, None, 4] and [r["status"] for r in rows] == ["ok", "invalid", "ok"]
    assert metrics["num_invalid"] == 1 and metrics["num_correct"] == 1 and metrics["accuracy"] == pytest.approx(1 / 3)


# ---------------------------------------------------------------- scripts
def test_egoschema_script_bad_videos_submission_resume(run_dir, shapes_dir, tmp_path, capsys, monkeypatch):
    data = tmp_path / "ego"
    shutil.copytree(shapes_dir, data)
    recs = json.loads((data / "questions.json").read_text())
    answers = json.loads((data / "subset_answers.json").read_text())
    for uid in ("gone", "broken"):
        recs.append({**recs[0], "q_uid": uid})
        answers[uid] = 1
    recs.append({**recs[0], "q_uid": "no-public-answer"})
    shutil.copy(data / "videos" / f"{recs[0]['q_uid']}.mp4", data / "videos" / "no-public-answer.mp4")
    (data / "videos" / "broken.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    (data / "questions.json").write_text(json.dumps(recs))
    (data / "subset_answers.json").write_text(json.dumps(answers))
    argv = ["--data-dir", str(data), "--checkpoint", str(run_dir / "llm"), "--output-dir", str(tmp_path / "out"),
            "--batch-size", "5", "--max-clips", "2", "--device", "cpu"]
    with pytest.raises(SystemExit, match="nope does not exist"):
        egoschema.main([*argv, "--checkpoint", str(tmp_path / "nope")])
    result = egoschema.main(argv)
    head = last_json(capsys)
    assert head["num_questions"] == 7 and head["num_scored"] == 6  # 4 Shapes + gone + broken have answers
    assert head["num_missing_video"] == 1 and head["num_unreadable_video"] == 1 and head["submission_filled"] == 2
    assert head["accuracy"] == pytest.approx(result["num_correct"] / 6)
    submission = json.loads((tmp_path / "out" / "submission.json").read_text())
    assert list(submission) == [r["q_uid"] for r in recs] and submission["gone"] == submission["broken"] == -1
    assert all(0 <= submission[r["q_uid"]] < 5 for r in recs if r["q_uid"] not in ("gone", "broken"))
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert MC_INSTRUCTION in metrics["prompt_example"] and "<frame_00000>…<frame_00063>" in metrics["prompt_example"]
    assert metrics["video"]["fps"] == 8 and metrics["video"]["frames_per_clip"] == 16
    assert metrics["video"]["max_clips"] == 2 and metrics["decoding"]["ties"] == "lowest index"
    by_kind = metrics["accuracy_by_kind"]  # the copies of question 0 keep its kind
    assert set(by_kind) <= set(QUESTION_KINDS) and sum(k["num_scored"] for k in by_kind.values()) == 6
    assert sum(k["num_scored"] for k in metrics["accuracy_by_num_objects"].values()) == 6
    calls = counting(monkeypatch)
    egoschema.main(argv + ["--subset-only", "--unanswered-fill", "0"])
    assert calls == [] and last_json(capsys)["submission_filled"] == 2
    submission = json.loads((tmp_path / "out" / "submission.json").read_text())
    assert "no-public-answer" not in submission and submission["gone"] == 0


def test_egoschema_no_arguments_uses_embedded_default(run_dir, tmp_path, capsys, monkeypatch):
    shutil.copytree(run_dir / "llm", tmp_path / "runs" / "llm_sft_comp" / "final")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(egoschema, "SHAPES_QUESTIONS", 3)
    egoschema.main([])
    out = capsys.readouterr().out
    assert "no --data-dir: using the embedded Shapes EgoSchema questions in runs/shapes_data/egoschema" in out
    assert "no --checkpoint" in out and "runs/llm_sft_comp/final" in out
    head = json.loads(out.strip().splitlines()[-1])
    assert head["num_questions"] == head["num_scored"] == 3 and head["mode"] == "likelihood"
    assert (tmp_path / "runs/eval/egoschema_likelihood/submission.json").is_file()


def test_multiple_choice_script_on_the_shared_path(run_dir, video, tmp_path, capsys, monkeypatch):
    data = [{"video": video, "question": f"Q{i}?", "options": ["x", "y", "z"], "answer": i % 3} for i in range(3)]
    (tmp_path / "mc.json").write_text(json.dumps(data))
    calls = counting(monkeypatch)
    result = multiple_choice.main(["--data", str(tmp_path / "mc.json"), "--checkpoint", str(run_dir / "llm"),
                                   "--output-dir", str(tmp_path / "out"), "--device", "cpu", "--batch-size", "6"])
    assert sum(calls) == 9 and last_json(capsys)["num_scored"] == 3
    rows = ResultLog(tmp_path / "out" / "results.jsonl").load()
    assert all(len(r["scores"]) == 3 and r["pred"] == mc_core.pick(r["scores"]) for r in rows.values())
    assert result["video"]["clips_per_video"] == {"mean": 1.0, "min": 1, "max": 1}


# ---------------------------------------------------------------- open-ended QA
def test_open_qa_normalisation():
    assert open_qa.normalize_answer("The Two  dogs!") == "2 dogs"
    assert open_qa.normalize_answer("An apple, a pear.") == "apple pear"
    assert open_qa.exact_match("three", "3") and open_qa.exact_match("A man.", "man")
    assert not open_qa.exact_match("two men", "man")


def test_open_qa_script_exact_match_and_judge(run_dir, video, tmp_path, capsys, monkeypatch):
    data = [{"video": video, "question": "How many dogs?", "answer": "two"},
            {"video": video, "question": "What colour?", "answer": "red"},
            {"video": str(tmp_path / "missing.mp4"), "question": "What?", "answer": "x"}]
    (tmp_path / "qa.json").write_text(json.dumps(data))
    (tmp_path / "my_judge.py").write_text(
        "def score(question, answer, prediction):\n    return 5 if 'dog' in question else 1\n"
        "def bad(question, answer, prediction):\n    return 'yes'\n")
    replies = iter(["Two.", "blue"])
    monkeypatch.setattr(mc_core, "generate_reply", lambda *a, **k: next(replies))
    argv = ["--data", str(tmp_path / "qa.json"), "--checkpoint", str(run_dir / "llm"), "--device", "cpu",
            "--output-dir", str(tmp_path / "out")]
    result = open_qa.main(argv + ["--judge", f"{tmp_path / 'my_judge.py'}:score"])
    assert result["exact_match"] == pytest.approx(1 / 3) and result["num_missing_video"] == 1
    assert result["judge_score"] == pytest.approx((5 + 1 + 0) / 3)  # no prediction → not judged, 0
    assert last_json(capsys)["judge_score"] == pytest.approx(2.0)
    monkeypatch.chdir(tmp_path)  # module:function is found in the working directory
    again = open_qa.main(argv + ["--judge", "my_judge:score"])  # resumed: no generation, judged anew by name
    assert again["num_resumed"] == 3 and again["judge_score"] == pytest.approx(2.0)
    with pytest.raises(TypeError, match="must return a bool or a finite number"):
        open_qa.main(argv + ["--judge", "my_judge:bad"])
    with pytest.raises(SystemExit, match="no function 'nope'"):
        open_qa.main(argv + ["--judge", "my_judge:nope"])
    clips = []
    monkeypatch.setattr(mc_core, "generate_reply", lambda m, p, tokens, *a, **k: clips.append(len(tokens)) or "two")
    text_only = open_qa.main(argv[:-1] + [str(tmp_path / "text"), "--text-only"])
    # The control asks even the question whose video is missing, and never with clips.
    assert text_only["text_only"] and clips == [0, 0, 0] and text_only["num_missing_video"] == 0
