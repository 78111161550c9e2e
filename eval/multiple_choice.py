"""Generic multiple-choice video QA (Perception Test / MVBench style) on EgoSchema's scoring path.

    python eval/multiple_choice.py --data mc.json --checkpoint runs/llm_sft_comp/final
    python eval/multiple_choice.py --data mc.json --video-root /data/videos --mode generate

``--data`` is a JSON list of ``{"video", "question", "options": [2–5 strings], "answer": int,
"id"?}`` (:func:`eval.qa_io.read_mc_json`; relative video paths resolve against
``--video-root``, default the file's folder). Scoring is :mod:`eval.mc_core`, the code
``eval/egoschema.py`` runs: the same prompt as training, ``likelihood`` (default) or
``generate`` + :func:`eval.mc_core.parse_choice`, missing/unreadable videos counted.

Outputs in ``--output-dir`` (default ``runs/eval/mc_<file stem>_<mode>``): ``results.jsonl``
(resumable) and ``metrics.json`` (accuracy, 95% interval, status counts, prompt, clips,
decoding). The last line printed is one JSON object with the headline metrics.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# Runnable from a source checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from divot.modeling import CheckpointError  # noqa: E402
from eval import mc_core  # noqa: E402
from eval.qa_io import read_mc_json, write_json  # noqa: E402

HEADLINE = ("accuracy", "accuracy_ci95", "accuracy_interval", "num_questions", "num_scored", "num_correct",
            "num_invalid", "num_missing_video", "num_unreadable_video", "num_prompt_too_long")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="JSON list of {video, question, options, answer}")
    p.add_argument("--video-root", default=None, help="folder relative video paths start from")
    mc_core.add_run_args(p)
    args = p.parse_args(argv)
    mc_core.check_run_args(p, args)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.time()
    try:
        questions = read_mc_json(args.data, args.video_root)
    except (FileNotFoundError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    selected = questions[:args.limit] if args.limit else questions
    try:
        pipe = mc_core.load_pipeline(args)
    except CheckpointError as exc:
        sys.exit(f"error: {exc}")
    out_dir = Path(args.output_dir or f"runs/eval/mc_{Path(args.data).stem}_{args.mode}"
                   + ("_text_only" if args.text_only else ""))
    print(f"multiple choice ({args.data}): {len(selected)} of {len(questions)} questions, mode {args.mode}, "
          f"checkpoint {pipe.checkpoint} → {out_dir}")
    settings = mc_core.run_settings(pipe, args.mode, args.max_new_tokens, text_only=args.text_only,
                                    data=str(Path(args.data).resolve()))
    try:
        rows, metrics, resumed = mc_core.evaluate(pipe, selected, out_dir, mode=args.mode, batch_size=args.batch_size,
                                                  text_only=args.text_only, max_new_tokens=args.max_new_tokens,
                                                  settings=settings)
    except ValueError as exc:  # results of other settings in out_dir
        sys.exit(f"error: {exc}")
    result = {**metrics, "num_resumed": resumed, "data": str(args.data), "limit": args.limit,
              **mc_core.run_report(pipe, selected, rows, args.mode, args.max_new_tokens),
              "seconds": round(time.time() - start, 1)}
    write_json(out_dir / "metrics.json", result)
    acc = result["accuracy"]
    print(f"accuracy {'n/a' if acc is None else f'{acc:.3f}'} over {result['num_scored']} questions "
          f"({resumed} resumed); invalid {result['num_invalid']}, missing videos {result['num_missing_video']}, "
          f"unreadable {result['num_unreadable_video']}; wrote {out_dir / 'metrics.json'}")
    print(json.dumps({k: result[k] for k in HEADLINE} | {"mode": args.mode, "text_only": args.text_only,
                                                          "checkpoint": str(pipe.checkpoint),
                                                          "data": str(args.data)}))
    return result


if __name__ == "__main__":
    main()
