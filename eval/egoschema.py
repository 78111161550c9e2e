"""EgoSchema evaluation of a Divot-LLM: five-way multiple choice about a video.

    python eval/egoschema.py                                   # embedded Shapes questions, quick-start checkpoint
    python eval/egoschema.py --data-dir /data/egoschema --checkpoint runs/llm_sft_comp/final
    python eval/egoschema.py --data-dir /data/egoschema --subset-only          # the 500 public answers only
    python eval/egoschema.py --data-dir /data/lmms-egoschema --questions Subset/test-00000-of-00001.parquet
    python eval/egoschema.py --mode generate --max-new-tokens 16

Data (``--data-dir``): the official release layout — ``questions.json``,
``subset_answers.json`` (the public answers), ``videos/<q_uid>.mp4`` — or the lmms-eval layout
(rows with ``question_idx``, ``question``, ``video_idx``, ``option`` as five ``"A. …"`` strings
and ``answer``, in a local .parquet/.json/.jsonl file; ``--questions`` picks the file when the
folder holds several); see :mod:`eval.qa_io`. With no ``--data-dir`` it runs on the embedded
default: the Shapes test questions in the release layout, written by
``scripts/make_shapes_dataset.py``'s own code into ``runs/shapes_data/egoschema`` when absent,
with the checkpoint the quick start trains (:func:`llm.pipeline.find_checkpoint`).

Scoring (:mod:`eval.mc_core`): ``likelihood`` (default) scores each option by the mean
log-probability of its reply ``"{option}</s>"`` (deterministic; ties → lowest index);
``generate`` decodes greedily and maps the answer with :func:`eval.mc_core.parse_choice`,
counting unparseable answers as invalid. A missing or unreadable video is counted, not fatal.

Outputs in ``--output-dir`` (default ``runs/eval/egoschema_<mode>``):

* ``results.jsonl`` — one line per question (status, prediction, scores or generated text);
  a re-run with the same settings resumes, skipping the questions already there;
* ``submission.json`` — ``{q_uid: int}`` for **every** question loaded (after
  ``--subset-only``), the file the public evaluation server accepts. Rule: a question
  without a prediction (invalid answer, missing/unreadable video, prompt too long, or not
  evaluated because of ``--limit``) gets ``--unanswered-fill``, default -1 (no option), which
  the server counts wrong — the script never guesses; ``--unanswered-fill 0`` if a server
  insists on 0–4. ``metrics.json`` says how many entries were filled;
* ``metrics.json`` — accuracy over the questions with a known answer (the public subset),
  its 95% interval, the count of each status, the exact prompt, clips, frames, fps and
  decoding settings.

The last line printed is one JSON object with the headline metrics.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

# Runnable from a source checkout without installing the package.
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from divot.modeling import CheckpointError  # noqa: E402
from divot.shapes import ShapesWorld  # noqa: E402
from eval import mc_core  # noqa: E402
from eval.qa_io import MCQuestion, read_egoschema_release, read_lmms_egoschema, write_json  # noqa: E402
from llm.pipeline import find_checkpoint  # noqa: E402

DEFAULT_SHAPES_ROOT = Path("runs/shapes_data")  # egoschema/ inside, as scripts/make_shapes_dataset.py writes it
SHAPES_QUESTIONS: int | None = None  # None: the script's --num-test default
_QUESTION_SUFFIXES = (".parquet", ".json", ".jsonl")
HEADLINE = ("accuracy", "accuracy_ci95", "accuracy_interval", "num_questions", "num_scored", "num_correct",
            "num_invalid", "num_missing_video", "num_unreadable_video", "num_prompt_too_long", "submission_filled")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None, help="EgoSchema folder (default: the embedded Shapes questions)")
    p.add_argument("--questions", default=None, help="lmms-eval .parquet/.json/.jsonl file (relative to --data-dir)")
    p.add_argument("--video-dir", default=None, help="videos folder (default: DATA_DIR/videos)")
    p.add_argument("--subset-only", action="store_true", help="only the questions with a public answer")
    p.add_argument("--unanswered-fill", type=int, default=-1, choices=[-1, 0, 1, 2, 3, 4],
                   help="submission entry of a question without a prediction (-1: no option)")
    mc_core.add_run_args(p)
    args = p.parse_args(argv)
    mc_core.check_run_args(p, args)
    return args


# ------------------------------------------------------------------ data
def _shapes_script():
    """scripts/make_shapes_dataset.py as a module (scripts/ is no package)."""
    path = REPO_ROOT / "scripts" / "make_shapes_dataset.py"
    spec = importlib.util.spec_from_file_location("make_shapes_dataset", path)
    if spec is None or not path.is_file():
        raise FileNotFoundError(f"{path} is needed to write the embedded Shapes questions; pass --data-dir")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ensure_shapes_egoschema(root: Path = DEFAULT_SHAPES_ROOT, num_questions: int | None = None) -> tuple[Path, bool]:
    """``root/egoschema`` in the release layout (the Shapes test split, the script's default
    seed and frame size); written only when absent. Returns (folder, whether it was written)."""
    folder = root / "egoschema"
    if (folder / "questions.json").is_file():  # written last, so its presence means complete
        return folder, False
    script = _shapes_script()
    defaults = script.parse_args([str(root)])
    world = ShapesWorld(seed=defaults.seed, size=defaults.size)
    script.write_egoschema(world, root, num_questions or defaults.num_test)
    return folder, True


def find_questions_file(data_dir: Path, questions: str | None) -> Path:
    if questions is not None:
        path = Path(questions) if Path(questions).is_absolute() or Path(questions).exists() else data_dir / questions
        if not path.is_file():
            raise FileNotFoundError(f"--questions file '{path}' does not exist")
        return path
    found = sorted(p for p in data_dir.rglob("*") if p.suffix in _QUESTION_SUFFIXES and p.is_file()
                   and p.name != "subset_answers.json" and "videos" not in p.relative_to(data_dir).parts)
    if len(found) == 1:
        return found[0]
    if not found:
        raise FileNotFoundError(f"{data_dir} holds neither questions.json (release layout) nor an lmms-eval "
                                f".parquet/.json/.jsonl file")
    names = ", ".join(str(p.relative_to(data_dir)) for p in found[:8])
    raise ValueError(f"{data_dir} holds several question files ({names}); pick one with --questions")


def load_questions(data_dir: Path, questions: str | None = None,
                   video_dir: str | None = None) -> tuple[list[MCQuestion], str, Path]:
    """(questions, layout name, the file read)."""
    if not data_dir.is_dir():
        raise FileNotFoundError(f"--data-dir '{data_dir}' is not a folder")
    if questions is None and (data_dir / "questions.json").is_file():
        return read_egoschema_release(data_dir, video_dir), "release", data_dir / "questions.json"
    path = find_questions_file(data_dir, questions)
    return read_lmms_egoschema(path, video_dir), "lmms-eval", path


def make_submission(questions: list[MCQuestion], rows: list[dict], fill: int) -> tuple[dict[str, int], int]:
    """``{q_uid: prediction}`` for every question, ``fill`` where there is none; and how many were filled."""
    preds = {row["uid"]: row.get("pred") for row in rows}
    submission = {q.uid: fill if preds.get(q.uid) is None else int(preds[q.uid]) for q in questions}
    return submission, sum(preds.get(q.uid) is None for q in questions)


# ------------------------------------------------------------------ main
def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.time()
    data_dir = Path(args.data_dir) if args.data_dir is not None else None
    if args.checkpoint is None:  # found before any data is written
        try:
            args.checkpoint = find_checkpoint()
        except CheckpointError as exc:
            sys.exit(f"error: {exc}")
        print(f"no --checkpoint: using {args.checkpoint} (llm.pipeline.find_checkpoint)")
    try:
        if data_dir is None:
            data_dir, written = ensure_shapes_egoschema(DEFAULT_SHAPES_ROOT, SHAPES_QUESTIONS)
            print(f"no --data-dir: using the embedded Shapes EgoSchema questions in {data_dir}"
                  + (" (written now by scripts/make_shapes_dataset.py's code)" if written else ""))
        questions, layout, source = load_questions(data_dir, args.questions, args.video_dir)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        sys.exit(f"error: {exc}")
    if args.subset_only:
        questions = [q for q in questions if q.answer is not None]
    selected = questions[:args.limit] if args.limit else questions
    try:
        pipe = mc_core.load_pipeline(args)
    except CheckpointError as exc:
        sys.exit(f"error: {exc}")
    out_dir = Path(args.output_dir or f"runs/eval/egoschema_{args.mode}"
                   + ("_text_only" if args.text_only else ""))
    print(f"EgoSchema ({layout} layout, {source}): {len(selected)} of {len(questions)} questions, "
          f"mode {args.mode}, up to {args.max_clips} clips per video → {out_dir}")
    settings = mc_core.run_settings(pipe, args.mode, args.max_new_tokens, text_only=args.text_only,
                                    data=str(source.resolve()))
    try:
        rows, metrics, resumed = mc_core.evaluate(pipe, selected, out_dir, mode=args.mode, batch_size=args.batch_size,
                                                  text_only=args.text_only, max_new_tokens=args.max_new_tokens,
                                                  settings=settings)
    except ValueError as exc:  # results of other settings in out_dir
        sys.exit(f"error: {exc}")
    submission, filled = make_submission(questions, rows, args.unanswered_fill)
    write_json(out_dir / "submission.json", submission)
    result = {**metrics, "submission_filled": filled, "unanswered_fill": args.unanswered_fill,
              "num_resumed": resumed, "layout": layout, "data": str(source), "subset_only": args.subset_only,
              "limit": args.limit, **mc_core.run_report(pipe, selected, rows, args.mode, args.max_new_tokens),
              "seconds": round(time.time() - start, 1)}
    write_json(out_dir / "metrics.json", result)
    acc, half = result["accuracy"], result["accuracy_ci95"]
    print(f"accuracy {'n/a' if acc is None else f'{acc:.3f}'}"
          + ("" if half is None else f" ± {half:.3f}") + f" over {result['num_scored']} questions with answers "
          f"({resumed} resumed); invalid {result['num_invalid']}, missing videos {result['num_missing_video']}, "
          f"unreadable {result['num_unreadable_video']}, too long {result['num_prompt_too_long']}")
    print(f"wrote {out_dir / 'results.jsonl'}, {out_dir / 'submission.json'} ({filled} filled with "
          f"{args.unanswered_fill}), {out_dir / 'metrics.json'}")
    print(json.dumps({k: result[k] for k in HEADLINE} | {"mode": args.mode, "text_only": args.text_only,
                                                          "checkpoint": str(pipe.checkpoint),
                                                          "data": str(source)}))
    return result


if __name__ == "__main__":
    main()
