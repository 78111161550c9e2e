"""Video-QA evaluation files: question sets in, resumable per-question results out.

Question layouts read here:

* **EgoSchema release** (:func:`read_egoschema_release`): ``questions.json`` — a list of
  ``{"q_uid", "question", "option 0" … "option 4", …}`` —, ``subset_answers.json``
  (``{q_uid: int}``, the public answers; optional) and ``videos/<q_uid>.mp4``.
* **lmms-eval EgoSchema** (:func:`read_lmms_egoschema`): rows with ``question_idx``,
  ``question``, ``video_idx`` (the id the submission uses), ``option`` (five ``"A. …"``
  strings) and ``answer`` (an index, a digit string, a letter, or empty when unknown), from a
  local ``.parquet`` (needs pyarrow), ``.json`` (a list) or ``.jsonl`` file; videos are
  ``<video_idx>.mp4`` in a ``videos/`` folder beside the file or one level up.
* **Generic multiple choice** (:func:`read_mc_json`, Perception-Test / MVBench style): a JSON
  list of ``{"video", "question", "options": [...], "answer": int}``.
* **Open-ended QA** (:func:`read_open_qa_json`, MSVD-QA / ActivityNet-QA style): a JSON list of
  ``{"video", "question", "answer"}``.

An optional ``"id"`` names an item (default: its position). Relative video paths resolve
against ``video_root`` (default: the JSON file's folder). A malformed file raises
``ValueError`` naming the file, the item and the problem; video files are only checked when
they are read, so a missing one is counted by the evaluation, never fatal.

(The module is not called ``datasets.py``: ``python eval/x.py`` puts ``eval/`` first on
``sys.path``, and such a file would shadow the Hugging Face ``datasets`` package.)
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

logger = logging.getLogger(__name__)

LETTERS = "ABCDE"
_LMMS_OPTION = re.compile(r"^\s*([A-E])[.)]\s*")


@dataclass(frozen=True)
class MCQuestion:
    """One multiple-choice question about one video; ``answer`` None when unknown (unscored)."""
    uid: str
    question: str
    options: tuple[str, ...]
    answer: int | None
    video: str
    extra: dict = field(default_factory=dict, compare=False)  # e.g. Shapes' "kind", "heldout"


@dataclass(frozen=True)
class OpenQuestion:
    """One open-ended question about one video with its reference answer."""
    uid: str
    question: str
    answer: str
    video: str


# ------------------------------------------------------------------ helpers
def _load_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{what} '{path}' does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from exc


def _json_list(path: Path, what: str) -> list:
    records = _load_json(path, what)
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path}: expected a non-empty JSON list of {what} items")
    return records


def _need(record: Any, keys: Iterable[str], where: str) -> None:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object, got {type(record).__name__}")
    missing = [k for k in keys if k not in record]
    if missing:
        raise ValueError(f"{where}: missing keys {missing}")


def _check_unique(uids: Sequence[str], path: Path) -> None:
    seen, dup = set(), []
    for uid in uids:
        if uid in seen:
            dup.append(uid)
        seen.add(uid)
    if dup:
        raise ValueError(f"{path}: duplicate ids {sorted(set(dup))[:5]}")


def _answer_index(value: Any, num_options: int, where: str) -> int | None:
    """An answer given as an index, a digit string or a letter; None / "" = unknown."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    index = None
    if isinstance(value, str):
        text = value.strip().upper()
        if len(text) == 1 and text in LETTERS:
            index = LETTERS.index(text)
        elif text.isdigit():
            index = int(text)
    elif isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and value.is_integer():
        index = int(value)
    if index is None or not 0 <= index < num_options:
        raise ValueError(f"{where}: answer {value!r} is not an option index 0–{num_options - 1} or a letter")
    return index


def _options(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(o, str) for o in value) \
            or not 2 <= len(value) <= len(LETTERS):
        raise ValueError(f"{where}: 'options' must be a list of 2 to {len(LETTERS)} strings, got {value!r}")
    return tuple(value)


def _video_path(video: Any, root: Path, where: str) -> str:
    if not isinstance(video, str) or not video:
        raise ValueError(f"{where}: 'video' must be a non-empty path, got {video!r}")
    return str(video if Path(video).is_absolute() else root / video)


# ------------------------------------------------------------------ EgoSchema
def read_egoschema_release(data_dir: str | os.PathLike, video_dir: str | os.PathLike | None = None) -> list[MCQuestion]:
    """The official release layout (module docstring); questions without a public answer
    get ``answer`` None."""
    data_dir = Path(data_dir)
    path = data_dir / "questions.json"
    records = _json_list(path, "EgoSchema questions")
    answers_path = data_dir / "subset_answers.json"
    answers = _load_json(answers_path, "EgoSchema answers") if answers_path.is_file() else {}
    if not isinstance(answers, dict):
        raise ValueError(f"{answers_path}: expected {{q_uid: answer index}}")
    if not answers:
        logger.warning("%s has no public answers (no %s): accuracy cannot be computed", data_dir, answers_path.name)
    videos = Path(video_dir) if video_dir is not None else data_dir / "videos"
    option_keys = [f"option {i}" for i in range(5)]
    out = []
    for i, rec in enumerate(records):
        where = f"{path}, item {i}"
        _need(rec, ["q_uid", "question", *option_keys], where)
        uid = str(rec["q_uid"])
        answer = _answer_index(answers.get(uid), 5, f"{answers_path}, {uid}")
        extra = {k: v for k, v in rec.items() if k not in ("q_uid", "question", *option_keys)
                 and isinstance(v, (str, int, float, bool))}
        out.append(MCQuestion(uid, str(rec["question"]), tuple(str(rec[k]) for k in option_keys), answer,
                              str(videos / f"{uid}.mp4"), extra))
    _check_unique([q.uid for q in out], path)
    unknown = sorted(set(answers) - {q.uid for q in out})
    if unknown:
        logger.warning("%s: %d answers for unknown q_uids, e.g. %s", answers_path, len(unknown), unknown[:3])
    return out


def _read_rows(path: Path) -> list:
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow), "
                              f"or convert it to JSON") from exc
        return pq.read_table(path).to_pylist()
    if path.suffix == ".jsonl":
        if not path.is_file():
            raise FileNotFoundError(f"lmms-eval EgoSchema file '{path}' does not exist")
        lines = path.read_text(encoding="utf-8").splitlines()
        try:
            return [json.loads(line) for line in lines if line.strip()]
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: a line is not valid JSON ({exc.msg})") from exc
    return _json_list(path, "lmms-eval EgoSchema")


def _strip_letters(options: Sequence[str], where: str) -> tuple[str, ...]:
    """``"A. text"`` → ``"text"`` when every option carries its own letter in order."""
    marks = [_LMMS_OPTION.match(o) for o in options]
    if all(m is not None and m.group(1) == LETTERS[i] for i, m in enumerate(marks)):
        return tuple(o[m.end():].strip() for o, m in zip(options, marks))
    logger.warning("%s: options are not lettered A., B., …; kept as written", where)
    return tuple(options)


def read_lmms_egoschema(path: str | os.PathLike, video_dir: str | os.PathLike | None = None) -> list[MCQuestion]:
    """lmms-eval rows (module docstring) as questions keyed by ``video_idx``."""
    path = Path(path)
    rows = _read_rows(path)
    if video_dir is None:
        near = [path.parent / "videos", path.parent.parent / "videos"]
        video_dir = next((d for d in near if d.is_dir()), near[0])
    out = []
    for i, row in enumerate(rows):
        where = f"{path}, row {i}"
        _need(row, ["question_idx", "question", "video_idx", "option", "answer"], where)
        options = _strip_letters(_options(list(row["option"]), where), where)
        answer = _answer_index(row["answer"], len(options), where)
        uid = str(row["video_idx"])
        out.append(MCQuestion(uid, str(row["question"]), options, answer, str(Path(video_dir) / f"{uid}.mp4"),
                              {"question_idx": row["question_idx"]}))
    _check_unique([q.uid for q in out], path)
    return out


# ------------------------------------------------------------------ generic files
def read_mc_json(path: str | os.PathLike, video_root: str | os.PathLike | None = None) -> list[MCQuestion]:
    """``[{"video", "question", "options": [...], "answer": int, "id"?}, …]``; a missing or
    null answer leaves the question unscored."""
    path = Path(path)
    root = Path(video_root) if video_root is not None else path.parent
    out = []
    for i, rec in enumerate(_json_list(path, "multiple-choice")):
        where = f"{path}, item {i}"
        _need(rec, ["video", "question", "options"], where)
        options = _options(rec["options"], where)
        out.append(MCQuestion(str(rec.get("id", i)), str(rec["question"]), options,
                              _answer_index(rec.get("answer"), len(options), where),
                              _video_path(rec["video"], root, where)))
    _check_unique([q.uid for q in out], path)
    return out


def read_open_qa_json(path: str | os.PathLike, video_root: str | os.PathLike | None = None) -> list[OpenQuestion]:
    """``[{"video", "question", "answer", "id"?}, …]``."""
    path = Path(path)
    root = Path(video_root) if video_root is not None else path.parent
    out = []
    for i, rec in enumerate(_json_list(path, "open-ended QA")):
        where = f"{path}, item {i}"
        _need(rec, ["video", "question", "answer"], where)
        out.append(OpenQuestion(str(rec.get("id", i)), str(rec["question"]), str(rec["answer"]),
                                _video_path(rec["video"], root, where)))
    _check_unique([q.uid for q in out], path)
    return out


# ------------------------------------------------------------------ results
def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


class ResultLog:
    """Per-question results, one JSON object a line, each with a ``"uid"``.

    Appended and flushed as questions finish, so an interrupted run resumes where it
    stopped. When a uid occurs twice the later line wins (a row can be updated by appending).
    A line cut short by a crash is skipped with a warning: its question is simply redone.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def load(self) -> dict[str, dict]:
        rows: dict[str, dict] = {}
        if not self.path.is_file():
            return rows
        for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("%s line %d is not valid JSON (an interrupted write?); redoing it", self.path, number)
                continue
            if isinstance(row, dict) and "uid" in row:
                rows[str(row["uid"])] = row
        return rows

    def append(self, rows: Sequence[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A crash can leave a partial last line; start on a fresh one so no good row merges into it.
        broken = self.path.is_file() and self.path.stat().st_size and not self.path.read_bytes().endswith(b"\n")
        with self.path.open("a", encoding="utf-8") as f:
            if broken:
                f.write("\n")
            for row in rows:
                f.write(json.dumps(row) + "\n")
            f.flush()


def check_settings(path: str | os.PathLike, settings: dict) -> None:
    """Record the settings a results folder was made with; a resumed run must use the same ones,
    or the results would mix two evaluations."""
    path = Path(path)
    if path.is_file():
        before = _load_json(path, "settings")
        changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        if changed:
            diffs = "; ".join(f"{k}: {before.get(k)!r} → {settings.get(k)!r}" for k in changed)
            raise ValueError(f"{path.parent} holds results made with other settings ({diffs}); "
                             f"use another --output-dir or delete it to start over")
        return
    write_json(path, settings)
