"""Open-ended video QA (MSVD-QA / ActivityNet-QA style): normalised exact match, plus your judge.

    python eval/open_qa.py --data qa.json --checkpoint runs/llm_sft_comp/final
    python eval/open_qa.py --data qa.json --judge my_judge:score         # module on sys.path / cwd
    python eval/open_qa.py --data qa.json --judge path/to/judge.py:score

``--data`` is a JSON list of ``{"video", "question", "answer", "id"?}``
(:func:`eval.qa_io.read_open_qa_json`). The prompt is the question as written (plus
``--instruction`` on a new line, default none) after the video's clips; the answer is greedy
(``--max-new-tokens``), as :func:`eval.mc_core.generate_reply` writes it.

**Exact match** compares :func:`normalize_answer` of the prediction and of the reference:
lower-case; punctuation removed; number words zero–twenty written as digits; the articles
"a", "an", "the" dropped; whitespace collapsed.

**Judge hook** (``--judge module:function``): ``function(question, answer, prediction)``
returns a bool or a number (e.g. a 0–5 rating, or 0/1); the mean and its 95% interval are
reported as ``judge_score`` next to exact match. Scores are stored per question in
``results.jsonl`` with the judge's name; a later run with another judge scores the rows it has
not scored (the newer line wins). A question whose video is missing or unreadable has no
prediction: exact match 0, and the judge is not called (score 0).

Outputs in ``--output-dir`` (default ``runs/eval/open_qa_<file stem>``): ``results.jsonl``
(resumable) and ``metrics.json``. The last line printed is one JSON object with the headline metrics.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import re
import string
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

# Runnable from a source checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from divot.metrics import mean_ci95  # noqa: E402
from divot.modeling import CheckpointError  # noqa: E402
from eval import mc_core  # noqa: E402
from eval.qa_io import OpenQuestion, ResultLog, check_settings, read_open_qa_json, write_json  # noqa: E402
from llm.pipeline import PromptTooLongError  # noqa: E402

NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
ARTICLES = {"a", "an", "the"}
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
HEADLINE = ("exact_match", "exact_match_ci95", "judge_score", "judge_score_ci95", "num_questions",
            "num_missing_video", "num_unreadable_video", "num_prompt_too_long")

Judge = Callable[[str, str, str], "bool | float"]


# ------------------------------------------------------------------ scoring
def normalize_answer(text: str) -> str:
    """Lower-case, punctuation removed, number words → digits, articles dropped, spaces collapsed."""
    words = _PUNCTUATION.sub("", text.lower()).split()
    return " ".join(NUMBER_WORDS.get(w, w) for w in words if w not in ARTICLES)


def exact_match(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


def load_judge(spec: str) -> Judge:
    """``module:function`` (imported; the working directory is searched too) or
    ``path/to/file.py:function``."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ValueError(f"--judge must be module:function or file.py:function, got {spec!r}")
    if target.endswith(".py"):
        if not Path(target).is_file():
            raise FileNotFoundError(f"judge file '{target}' does not exist")
        loader_spec = importlib.util.spec_from_file_location(Path(target).stem, target)
        module = importlib.util.module_from_spec(loader_spec)
        loader_spec.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path:
            sys.path.append(os.getcwd())
        module = importlib.import_module(target)
    judge = getattr(module, name, None)
    if not callable(judge):
        raise ValueError(f"--judge {spec}: {target} has no function {name!r}")
    return judge


def judge_score(judge: Judge, name: str, question: str, answer: str, prediction: str) -> float:
    value = judge(question, answer, prediction)
    if isinstance(value, bool) or (isinstance(value, (int, float)) and math.isfinite(value)):
        return float(value)
    raise TypeError(f"judge {name} returned {value!r}; it must return a bool or a finite number")


# ------------------------------------------------------------------ answering
def answer_open(model, questions: Sequence[OpenQuestion], tokens_of, max_new_tokens: int,
                instruction: str = "") -> list[dict]:
    rows = []
    for q in questions:
        tokens, status = tokens_of(q.video)
        row = {"uid": q.uid, "status": status, "prediction": None, "answer": q.answer, "exact_match": False,
               "num_clips": None if tokens is None else int(tokens.shape[0])}
        if tokens is not None:
            prompt = q.question if not instruction else f"{q.question}\n{instruction}"
            try:
                row["prediction"] = mc_core.generate_reply(model, prompt, tokens, max_new_tokens)
                row["exact_match"] = exact_match(row["prediction"], q.answer)
            except PromptTooLongError:
                row["status"] = mc_core.TOO_LONG
        rows.append(row)
    return rows


def apply_judge(judge: Judge, name: str, questions: Sequence[OpenQuestion], rows: list[dict],
                log: ResultLog) -> list[dict]:
    """Rows with ``judge`` scores by ``name``; rows it had not scored are scored and re-logged."""
    by_uid = {q.uid: q for q in questions}
    out, updated = [], []
    for row in rows:
        if row.get("judge_name") != name:
            q = by_uid[row["uid"]]
            score = 0.0 if row["prediction"] is None else judge_score(judge, name, q.question, q.answer,
                                                                      row["prediction"])
            row = {**row, "judge": score, "judge_name": name}
            updated.append(row)
        out.append(row)
    if updated:
        log.append(updated)
    return out


def summarize_open(rows: Sequence[dict], judged: bool) -> dict:
    em = mc_core.accuracy([bool(row["exact_match"]) for row in rows])
    statuses = Counter(row["status"] for row in rows)
    out = {"exact_match": em["accuracy"], "exact_match_ci95": em["accuracy_ci95"],
           "exact_match_interval": em["accuracy_interval"], "num_questions": len(rows),
           "num_exact": em["num_correct"], "num_answered": statuses[mc_core.OK],
           **{f"num_{s}": statuses[s] for s in (mc_core.MISSING, mc_core.UNREADABLE, mc_core.TOO_LONG)},
           "judge_score": None, "judge_score_ci95": None}
    if judged:
        mean, half = mean_ci95([row["judge"] for row in rows])
        out["judge_score"], out["judge_score_ci95"] = (None if math.isnan(v) else v for v in (mean, half))
    return out


# ------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="JSON list of {video, question, answer}")
    p.add_argument("--video-root", default=None, help="folder relative video paths start from")
    p.add_argument("--instruction", default="", help="text added on a new line after each question")
    p.add_argument("--judge", default=None, help="module:function or file.py:function (question, answer, prediction)")
    mc_core.add_run_args(p, modes=("generate",))
    args = p.parse_args(argv)
    mc_core.check_run_args(p, args)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.time()
    try:
        questions = read_open_qa_json(args.data, args.video_root)
        judge = load_judge(args.judge) if args.judge else None
    except (FileNotFoundError, ValueError, ImportError) as exc:
        sys.exit(f"error: {exc}")
    selected = questions[:args.limit] if args.limit else questions
    try:
        pipe = mc_core.load_pipeline(args)
    except CheckpointError as exc:
        sys.exit(f"error: {exc}")
    out_dir = Path(args.output_dir or f"runs/eval/open_qa_{Path(args.data).stem}"
                   + ("_text_only" if args.text_only else ""))
    print(f"open-ended QA ({args.data}): {len(selected)} of {len(questions)} questions, checkpoint "
          f"{pipe.checkpoint} → {out_dir}")
    settings = mc_core.run_settings(pipe, "generate", args.max_new_tokens, text_only=args.text_only,
                                    data=str(Path(args.data).resolve()),
                                    prompt="{question}" + (f"\n{args.instruction}" if args.instruction else ""))
    try:
        check_settings(out_dir / "settings.json", settings)
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    log = ResultLog(out_dir / "results.jsonl")
    tokens_of = mc_core.NoVideo(pipe) if args.text_only else mc_core.VideoTokens(pipe)
    rows, resumed = mc_core.run_questions(
        selected, lambda qs: answer_open(pipe.model, qs, tokens_of, args.max_new_tokens, args.instruction),
        log, 1, desc="open QA")
    if judge is not None:
        rows = apply_judge(judge, args.judge, selected, rows, log)
    result = {**summarize_open(rows, judge is not None), "judge": args.judge, "text_only": args.text_only,
              "num_resumed": resumed,
              "data": str(args.data), "checkpoint": str(pipe.checkpoint),
              "prompt_example": mc_core.prompt_example(pipe.model, selected[0].question if not args.instruction
                                                       else f"{selected[0].question}\n{args.instruction}"),
              "normalisation": normalize_answer.__doc__, "video": mc_core.video_report(pipe, rows),
              "decoding": mc_core.greedy_report(args.max_new_tokens), "seconds": round(time.time() - start, 1)}
    write_json(out_dir / "metrics.json", result)
    em = result["exact_match"]
    print(f"exact match {em:.3f} over {len(rows)} questions ({resumed} resumed)"
          + ("" if judge is None else f"; judge {args.judge}: {result['judge_score']}"))
    print(json.dumps({k: result[k] for k in HEADLINE} | {"checkpoint": str(pipe.checkpoint), "data": str(args.data)}))
    return result


if __name__ == "__main__":
    main()
