"""Multiple-choice video QA with a Divot-LLM: the one scoring path of ``eval/egoschema.py`` and
``eval/multiple_choice.py`` (``eval/open_qa.py`` shares its video reading and generation).

The prompt and the answer are the Shapes QA SFT's own (:func:`llm.data_sources.format_multiple_choice`
and :func:`~llm.data_sources.format_mc_answer`), so training and evaluation agree: the user
message is the question, the options lettered ``A. …`` one per line and the answer
instruction, after the video's clips; the reply is the option's text.

Two modes:

* ``likelihood`` (deterministic): for each option i, the score is the mean log-probability of
  the reply ``format_mc_answer(options, i)`` plus its ``</s>`` (the supervised labels of
  :func:`llm.text_tokenizer.encode_comprehension`), i.e. the summed log-probability divided
  by the number of reply tokens, so longer options are not penalised for their length. The
  prediction is the highest score; ties go to the lowest index.
* ``generate``: greedy decoding until ``</s>`` (or ``<vid>``), then :func:`parse_choice`. An
  answer it cannot map to exactly one option is *invalid*: counted wrong, never guessed.

Every question ends with one status: ``ok``; ``invalid`` (generate mode); ``missing_video``
(no file); ``unreadable_video`` (the decoder failed); ``prompt_too_long`` (clips + text exceed
the model's context). Only ``ok`` rows carry a prediction; all others count as wrong.

Axis glossary: c = clips, n = tokens per clip (64), d = Divot token width, b = sequences,
L = sequence length.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from divot.metrics import mean_ci95
from divot.video_io import CLIP_FPS, CLIP_FRAMES, MAX_QA_CLIPS, VideoReadError
from eval.qa_io import LETTERS, MCQuestion, ResultLog, check_settings
from llm.chat import decode_text
from llm.data_sources import format_mc_answer, format_multiple_choice
from llm.pipeline import PromptTooLongError, load
from llm.text_tokenizer import IGNORE_INDEX, encode_comprehension, pad_batch

logger = logging.getLogger(__name__)

MODES = ("likelihood", "generate")
OK, INVALID, MISSING, UNREADABLE, TOO_LONG = "ok", "invalid", "missing_video", "unreadable_video", "prompt_too_long"
STATUSES = (OK, INVALID, MISSING, UNREADABLE, TOO_LONG)
# Per-group accuracies when questions carry these (Shapes does).
GROUP_KEYS = ("kind", "heldout", "num_objects")


@dataclass(frozen=True)
class ScoreRequest:
    """Score ``answer`` as the reply to ``prompt`` shown after the clips ``clip_tokens`` (c, n, d)."""
    prompt: str
    answer: str
    clip_tokens: torch.Tensor


# ------------------------------------------------------------------ videos
class VideoTokens:
    """``(tokens (c, n, d) | None, status)`` of a video file, read as :mod:`llm.pipeline` reads
    it. The last video is remembered: benchmarks ask several questions about one video in a row."""

    def __init__(self, pipe):
        self.pipe = pipe
        self._last: tuple[str | None, tuple] = (None, (None, MISSING))

    def __call__(self, path: str) -> tuple[torch.Tensor | None, str]:
        if path != self._last[0]:
            self._last = (path, self._read(path))
        return self._last[1]

    def _read(self, path: str) -> tuple[torch.Tensor | None, str]:
        if not Path(path).is_file():
            logger.warning("video %s does not exist; its question counts as unanswered", path)
            return None, MISSING
        try:
            return self.pipe.encode_videos(path), OK
        except VideoReadError as exc:
            logger.warning("%s; its question counts as unanswered", exc)
            return None, UNREADABLE


class NoVideo:
    """The text-only control: every question is asked with no clips at all, so its accuracy
    is what the question and options alone give away (near chance = answers need the video)."""

    def __init__(self, pipe):
        cfg = pipe.model.config
        self.empty = torch.zeros(0, cfg.num_query_tokens, cfg.token_dim)

    def __call__(self, path: str) -> tuple[torch.Tensor, str]:
        return self.empty, OK


# ------------------------------------------------------------------ likelihood
def encode_request(model, request: ScoreRequest):
    return encode_comprehension(model.text_tokenizer, request.prompt, request.answer,
                                int(request.clip_tokens.shape[0]), model.config.num_query_tokens)


def option_scores(model, requests: Sequence[ScoreRequest], batch_size: int = 8) -> list[float]:
    """Mean log-probability of each request's reply tokens (with ``</s>``), ``batch_size``
    sequences per forward."""
    encoded = [encode_request(model, r) for r in requests]
    scores: list[float] = []
    with model.inference():
        for start in range(0, len(encoded), batch_size):
            chunk = slice(start, start + batch_size)
            scores += _batch_scores(model, encoded[chunk], [r.clip_tokens for r in requests[chunk]])
    return scores


def _batch_scores(model, encoded, clip_tokens: list[torch.Tensor]) -> list[float]:
    batch = {k: v.to(model.device) for k, v in pad_batch(encoded, model.pad_token_id).items()}
    # Each row's clips are contiguous and rows come in order: concatenation is the clip-major
    # order the data contract asks for.
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], clip_mask=batch["clip_mask"],
                clip_tokens=torch.cat(clip_tokens), return_logits=False)
    targets = batch["labels"][:, 1:]
    supervised = targets != IGNORE_INDEX
    # The LM head only where a reply token is predicted: full (b, L, vocab) logits are large.
    logits = model.base_model.lm_head(out.hidden_states[:, :-1][supervised]).float()
    picked = logits.log_softmax(-1).gather(-1, targets[supervised][:, None])[:, 0].double()
    rows = supervised.nonzero()[:, 0]
    sums = torch.zeros(targets.shape[0], dtype=torch.float64, device=picked.device).index_add_(0, rows, picked)
    return (sums / supervised.sum(1).clamp(min=1)).tolist()


def pick(scores: Sequence[float]) -> int:
    """Index of the highest score; ties go to the lowest index."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def _fits(model, requests: Sequence[ScoreRequest]) -> bool:
    limit = model.config.max_position_embeddings
    return all(len(encode_request(model, r).input_ids) <= limit for r in requests)


def answer_by_likelihood(model, questions: Sequence[MCQuestion], tokens_of: Callable, batch_size: int) -> list[dict]:
    """One result row per question (see :func:`new_row`), with the per-option ``scores``."""
    rows, owners, requests = [], [], []
    for q in questions:
        tokens, status = tokens_of(q.video)
        row = new_row(q, status, tokens)
        rows.append(row)
        if tokens is None:
            continue
        prompt = format_multiple_choice(q.question, q.options)
        mine = [ScoreRequest(prompt, format_mc_answer(q.options, i), tokens) for i in range(len(q.options))]
        if not _fits(model, mine):
            row["status"] = TOO_LONG
            continue
        owners.append((row, len(mine)))
        requests += mine
    scores = option_scores(model, requests, batch_size) if requests else []
    start = 0
    for row, count in owners:
        mine = scores[start:start + count]
        start += count
        row["scores"] = mine  # full precision: pick(row["scores"]) == row["pred"]
        row["pred"] = pick(mine)
    return [_mark(row) for row in rows]


# ------------------------------------------------------------------ generation
def generate_reply(model, prompt: str, clip_tokens: torch.Tensor, max_new_tokens: int = 32) -> str:
    """Greedy reply to ``prompt`` after the clips (stops at ``</s>`` or ``<vid>``)."""
    encoded = encode_comprehension(model.text_tokenizer, prompt, None, int(clip_tokens.shape[0]),
                                   model.config.num_query_tokens)
    room = model.config.max_position_embeddings - len(encoded.input_ids)
    if room < 1:
        raise PromptTooLongError(f"prompt of {len(encoded.input_ids)} tokens leaves no room in the context "
                                 f"of {model.config.max_position_embeddings}")
    new = model.generate_text(encoded.input_ids, encoded.clip_mask, clip_tokens,
                              max_new_tokens=min(max_new_tokens, room), do_sample=False)
    return decode_text(model.text_tokenizer, new).strip()


_LETTER_FORM = re.compile(
    r"^\s*(?:(?i:answer)\s*:\s*)?"                                   # optional "Answer:"
    r"(?:\((?P<paren>[A-Z])\)|(?P<mark>[A-Z])[.)]|(?P<bare>[A-Z])(?=\s*$))")


def _norm_option(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .,;:!?\"'")


def parse_choice(text: str, options: Sequence[str]) -> int | None:
    """The option a generated answer names, or None (invalid). Deterministic, never guesses.

    Letter rule: the reply starts with an upper-case letter in one of the forms ``C``
    (alone), ``C.`` / ``C)`` (possibly followed by text), ``(C)``, each optionally after
    ``Answer:`` (any case). A letter beyond the options makes the reply invalid.
    Text rule: what follows the letter (or the whole reply without one), lower-cased with
    spaces collapsed and surrounding punctuation removed, equals exactly one option's text
    normalised the same way. The answer is the one option named when the rules name one
    option between them (the letter alone, the text alone, or both agreeing); none, or two
    different ones, is invalid. E.g. ``"C. red"`` with C = red → C; ``"C. blue"`` with
    A = blue → invalid; ``"A red circle"`` is no letter form (a letter then a space).
    """
    letter, rest = None, text
    match = _LETTER_FORM.match(text)
    if match:
        char = match.group("paren") or match.group("mark") or match.group("bare")
        letter = LETTERS.find(char)
        if not 0 <= letter < len(options):
            return None
        rest = text[match.end():]
    wanted = _norm_option(rest)
    same = [i for i, option in enumerate(options) if wanted and _norm_option(option) == wanted]
    by_text = same[0] if len(same) == 1 else None
    named = {i for i in (letter, by_text) if i is not None}
    return named.pop() if len(named) == 1 else None


def answer_by_generation(model, questions: Sequence[MCQuestion], tokens_of: Callable,
                         max_new_tokens: int) -> list[dict]:
    """One result row per question, with the generated ``output`` and its parsed ``pred``."""
    rows = []
    for q in questions:
        tokens, status = tokens_of(q.video)
        row = new_row(q, status, tokens)
        if tokens is not None:
            try:
                row["output"] = generate_reply(model, format_multiple_choice(q.question, q.options), tokens,
                                               max_new_tokens)
                row["pred"] = parse_choice(row["output"], q.options)
                row["status"] = OK if row["pred"] is not None else INVALID
            except PromptTooLongError:
                row["status"] = TOO_LONG
        rows.append(_mark(row))
    return rows


# ------------------------------------------------------------------ running + bookkeeping
def new_row(q: MCQuestion, status: str, tokens: torch.Tensor | None) -> dict:
    """``{"uid", "status", "pred", "answer", "correct", "num_clips"}`` (+ scores / output)."""
    return {"uid": q.uid, "status": status, "pred": None, "answer": q.answer, "correct": None,
            "num_clips": None if tokens is None else int(tokens.shape[0])}


def _mark(row: dict) -> dict:
    if row["answer"] is not None:
        row["correct"] = row["pred"] == row["answer"]
    return row


def run_questions(questions: Sequence, answer_fn: Callable[[Sequence], list[dict]], log: ResultLog,
                  group_size: int = 1, desc: str = "questions") -> tuple[list[dict], int]:
    """Rows for ``questions`` (in order) and how many came from ``log`` (a resumed run).
    ``answer_fn`` gets ``group_size`` questions at a time; each group is logged at once."""
    done = log.load()
    todo = [q for q in questions if q.uid not in done]
    resumed = len(questions) - len(todo)
    if resumed:
        logger.info("resuming: %d of %d questions already in %s", resumed, len(questions), log.path)
    for start in tqdm(range(0, len(todo), group_size), desc=desc, leave=False):
        rows = answer_fn(todo[start:start + group_size])
        log.append(rows)
        done.update((row["uid"], row) for row in rows)
    return [done[q.uid] for q in questions], resumed


def _clean(value: float) -> float | None:
    return None if value is None or math.isnan(value) else value


def accuracy(hits: Sequence[bool]) -> dict:
    """Accuracy with its normal-approximation 95% half-width (:func:`divot.metrics.mean_ci95`)
    and interval, clipped to [0, 1]; None where undefined (no or one question)."""
    mean, half = (_clean(v) for v in mean_ci95([float(h) for h in hits]))
    interval = None if mean is None or half is None else [max(0.0, mean - half), min(1.0, mean + half)]
    return {"accuracy": mean, "accuracy_ci95": half, "accuracy_interval": interval, "num_scored": len(hits),
            "num_correct": int(sum(hits))}


def summarize(questions: Sequence[MCQuestion], rows: Sequence[dict]) -> dict:
    """Accuracy over the questions with a known answer (every status counts: only an ``ok``
    row with the right option is correct) and the count of each status."""
    by_uid = {row["uid"]: row for row in rows}
    scored = [q for q in questions if q.answer is not None and q.uid in by_uid]
    out = accuracy([by_uid[q.uid].get("pred") == q.answer for q in scored])
    statuses = Counter(row["status"] for row in rows)
    out.update({"num_questions": len(rows), "num_answered": statuses[OK]})
    out.update({f"num_{status}": statuses[status] for status in STATUSES[1:]})
    for key in GROUP_KEYS:
        groups = sorted({str(q.extra[key]) for q in scored if key in q.extra})
        if groups:
            out[f"accuracy_by_{key}"] = {
                g: accuracy([by_uid[q.uid].get("pred") == q.answer for q in scored if str(q.extra.get(key)) == g])
                for g in groups}
    return out


# ------------------------------------------------------------------ one evaluation run
def evaluate(pipe, questions: Sequence[MCQuestion], out_dir: str | Path, *, mode: str = "likelihood",
             batch_size: int = 8, max_new_tokens: int = 32, settings: dict | None = None,
             text_only: bool = False) -> tuple[list[dict], dict, int]:
    """Answer ``questions`` with ``pipe`` (a :class:`llm.pipeline.DivotPipeline`), resuming from
    and appending to ``out_dir/results.jsonl``; returns (rows, :func:`summarize` metrics, number
    of rows resumed). ``settings`` are checked against those of an earlier run in ``out_dir``.
    ``text_only`` asks every question without its video (:class:`NoVideo`)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    out_dir = Path(out_dir)
    check_settings(out_dir / "settings.json", settings or run_settings(pipe, mode, max_new_tokens,
                                                                       text_only=text_only))
    tokens_of = NoVideo(pipe) if text_only else VideoTokens(pipe)
    if mode == "likelihood":
        group = max(1, math.ceil(batch_size / max((len(q.options) for q in questions), default=1)))
        rows, resumed = run_questions(
            questions, lambda qs: answer_by_likelihood(pipe.model, qs, tokens_of, batch_size),
            ResultLog(out_dir / "results.jsonl"), group, desc="likelihood")
    else:
        rows, resumed = run_questions(
            questions, lambda qs: answer_by_generation(pipe.model, qs, tokens_of, max_new_tokens),
            ResultLog(out_dir / "results.jsonl"), 1, desc="generate")
    return rows, summarize(questions, rows), resumed


def weights_fingerprint(*modules: torch.nn.Module | None) -> str:
    """A short digest of the modules' weights, so that a checkpoint retrained in the same folder
    does not resume the old checkpoint's results. It hashes each tensor's name, shape and first
    4096 values (not every byte: a 7B model would take seconds), enough to tell two trainings apart."""
    digest = hashlib.sha256()
    for i, module in enumerate(modules):
        if module is None:
            continue
        for name, tensor in sorted(module.state_dict().items()):
            head = tensor.detach().reshape(-1)[:4096].to("cpu", torch.float64)
            digest.update(f"{i}.{name}{tuple(tensor.shape)}".encode())
            digest.update(head.numpy().tobytes())
    return digest.hexdigest()[:16]


def run_settings(pipe, mode: str, max_new_tokens: int, **more) -> dict:
    """What decides the answers (a resumed run must match it): checkpoint and its weights, mode,
    clips, dtype, the prompt's instruction and the scored reply's form, and for generation the
    token budget."""
    checkpoint = None if pipe.checkpoint is None else str(Path(pipe.checkpoint).resolve())
    settings = {"checkpoint": checkpoint, "weights": weights_fingerprint(pipe.model, pipe.tokenizer),
                "mode": mode, "max_clips": pipe.max_clips,
                "dtype": str(pipe.model.dtype), "prompt": format_multiple_choice("{question}", ["{a}", "{b}"]),
                "reply": format_mc_answer(["{a}", "{b}"], 1)}
    if mode == "generate":
        settings["max_new_tokens"] = max_new_tokens
    return {**settings, **more}


def prompt_example(model, user_text: str, reply: str | None = None) -> str:
    """The exact prompt of ``user_text`` after one clip, decoded, its placeholders abbreviated."""
    n = model.config.num_query_tokens
    encoded = encode_comprehension(model.text_tokenizer, user_text, reply, 1, n)
    text = model.text_tokenizer.decode(encoded.input_ids)
    return re.sub(r"(?:<frame_\d{5}>)+", f"<frame_00000>…<frame_{n - 1:05d}>", text)


def video_report(pipe, rows: Sequence[dict]) -> dict:
    """How videos were read: clip count cap and the counts used, frames, fps, frame size."""
    clips = [row["num_clips"] for row in rows if row.get("num_clips")]
    used = {"mean": sum(clips) / len(clips), "min": min(clips), "max": max(clips)} if clips else None
    return {"max_clips": pipe.max_clips, "frames_per_clip": CLIP_FRAMES, "fps": CLIP_FPS,
            "clip_seconds": CLIP_FRAMES / CLIP_FPS, "frame_size": pipe.frame_size, "clips_per_video": used,
            "clip_note": f"<frame>…</frame> repeats once per clip; its {pipe.model.config.num_query_tokens} "
                         f"placeholders carry the projected Divot tokens"}


def run_report(pipe, questions: Sequence[MCQuestion], rows: Sequence[dict], mode: str, max_new_tokens: int) -> dict:
    """The exact prompt (the first question's; in likelihood mode with option A as the scored
    reply), the clip sampling and the decoding settings, for metrics.json."""
    report: dict = {"mode": mode, "checkpoint": str(pipe.checkpoint)}
    if questions:
        q = questions[0]
        reply = format_mc_answer(q.options, 0) if mode == "likelihood" else None
        report["prompt_example"] = prompt_example(pipe.model, format_multiple_choice(q.question, q.options), reply)
    report["video"] = video_report(pipe, rows)
    if mode == "likelihood":
        report["decoding"] = {"score": "mean log-probability of the reply tokens incl. </s> (sum / count)",
                              "reply": "format_mc_answer: the option's text, each option in turn",
                              "ties": "lowest index"}
    else:
        report["decoding"] = greedy_report(max_new_tokens)
        report["decoding"]["parser"] = ("eval.mc_core.parse_choice (letter form or exact option text; "
                                        "none or conflicting = invalid)")
    return report


def greedy_report(max_new_tokens: int) -> dict:
    return {"greedy": True, "max_new_tokens": max_new_tokens, "stop": ["</s>", "<vid>"]}


# ------------------------------------------------------------------ shared command line
def add_run_args(parser: argparse.ArgumentParser, modes: Sequence[str] = MODES) -> None:
    """The options every video-QA script shares."""
    parser.add_argument("--checkpoint", default=None,
                        help="Divot-LLM checkpoint directory (default: llm.pipeline.find_checkpoint())")
    parser.add_argument("--output-dir", default=None, help="results folder (a re-run resumes in it)")
    if len(modes) > 1:
        parser.add_argument("--mode", choices=list(modes), default=modes[0],
                            help="likelihood: score each option (deterministic); generate: greedy answer + parser")
    parser.add_argument("--max-clips", type=int, default=MAX_QA_CLIPS,
                        help="2-second clips per video, spread over longer videos")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N questions")
    parser.add_argument("--text-only", action="store_true",
                        help="control run: ask every question without its video (near chance = answers need the video)")
    if "likelihood" in modes:
        parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward (likelihood)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="answer length cap (generation)")
    parser.add_argument("--device", default=None, help="default: cuda when available")
    parser.add_argument("--dtype", default=None, help="LLM dtype, e.g. bfloat16 (default: the checkpoint's)")


def require_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, names) -> None:
    """``parser.error`` for the first of ``names`` (attribute names) that is set and below 1."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def check_run_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    require_positive(parser, args, ("max_clips", "limit", "batch_size", "max_new_tokens"))


def load_pipeline(args: argparse.Namespace):
    """:func:`llm.pipeline.load` with the shared options (raises CheckpointError with a hint)."""
    return load(args.checkpoint, device=args.device, dtype=args.dtype, max_clips=args.max_clips)
