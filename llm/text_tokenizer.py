"""Mistral text tokenizer with Divot's special tokens, and the prompt formats of DESIGN.md §4.

Special tokens, in vocabulary order after the 32000 Mistral-v0.1 pieces:
``<vid> </vid> <frame> </frame> <img> </img>`` then the query tokens
``<frame_00000>`` … ``<frame_00063>`` (ids 32000 … 32069 with the default tokenizer).

Prompt formats (DESIGN.md §4):

* comprehension: ``<s>[INST] <vid>{clips}</vid>{question} [/INST]\\n{answer}</s>``, each clip
  written ``<frame>`` + 64 placeholders + ``</frame>``;
* generation: ``<s>[INST] Generate a video of {caption} [/INST]\\n<vid><frame>`` + the 64
  query tokens + ``</frame></vid>``.

Decision (placeholders): a comprehension clip's 64 placeholders are the query tokens
``<frame_00000>`` … ``<frame_00063>`` themselves, as in the authors' released inference code,
so the vocabulary stays at exactly 32000 + 70 and a released embedding matrix loads as is.
The same ids therefore mean "clip input" in a user message and "generation query" in a
reply; which is which is never read back from the ids alone but recorded by the builders in
two masks: ``clip_mask`` (embeddings replaced by projected Divot tokens) and ``query_mask``
(learnable query embeddings, bidirectional block, read out by the GMM head).

Each user message (``[INST] … [/INST]\\n`` with its video placeholders inline) is encoded as
one string, the way the release encodes its instruction, so text right after a special token
gets no extra leading "▁". A text reply is tokenized as it reads after ``[/INST]\\n`` (so
"red" is ``red``, not ``▁red``) and closed by ``</s>``.
``<s>`` is prepended explicitly: tokenizers converted from the SentencePiece file do not add it.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

logger = logging.getLogger(__name__)

VID_START, VID_END = "<vid>", "</vid>"
FRAME_START, FRAME_END = "<frame>", "</frame>"
IMG_START, IMG_END = "<img>", "</img>"
QUERY_TOKEN_FORMAT = "<frame_{:05d}>"
NUM_QUERY_TOKENS = 64
MISTRAL_V1_VOCAB_SIZE = 32000
IGNORE_INDEX = -100  # label value skipped by the cross-entropy (HF convention)
GENERATION_INSTRUCTION = "Generate a video of {caption}"
_MISTRAL_V1_MODEL = ("data", "tokenizer.model.v1")


def query_tokens(num_query_tokens: int = NUM_QUERY_TOKENS) -> list[str]:
    return [QUERY_TOKEN_FORMAT.format(i) for i in range(num_query_tokens)]


def special_tokens(num_query_tokens: int = NUM_QUERY_TOKENS) -> list[str]:
    """All Divot special tokens in the order they are added to the vocabulary."""
    return [VID_START, VID_END, FRAME_START, FRAME_END, IMG_START, IMG_END] + query_tokens(num_query_tokens)


def default_sentencepiece_path() -> Path:
    """Mistral-7B v0.1's SentencePiece model, shipped inside the ``mistral-common`` package."""
    # find_spec locates the package without importing it (its import pulls in pydantic etc.).
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("mistral-common is not installed; pass a local tokenizer path instead")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*_MISTRAL_V1_MODEL)
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing from the installed mistral-common")
    return path


def _load_sentencepiece_file(model_file: Path):
    from transformers import LlamaTokenizer

    # LlamaTokenizer(vocab_file=...) silently builds a 3-token tokenizer in transformers 5;
    # from_pretrained on a directory holding ``tokenizer.model`` converts the real vocabulary.
    with tempfile.TemporaryDirectory(prefix="divot_tok_") as tmp:
        shutil.copyfile(model_file, Path(tmp) / "tokenizer.model")
        return LlamaTokenizer.from_pretrained(tmp, local_files_only=True)


def _load_base(path: str | os.PathLike | None):
    if path is None:
        return _load_sentencepiece_file(default_sentencepiece_path())
    path = Path(path)
    if path.is_file():
        return _load_sentencepiece_file(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a tokenizer directory or SentencePiece file")
    if not any((path / n).is_file() for n in ("tokenizer_config.json", "tokenizer.json")):
        return _load_sentencepiece_file(path / "tokenizer.model")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def load_text_tokenizer(path: str | os.PathLike | None = None, num_query_tokens: int = NUM_QUERY_TOKENS):
    """The LLM's tokenizer with Divot's special tokens added (never downloads).

    ``path`` None → Mistral-7B v0.1's vocabulary from ``mistral-common``; otherwise a local HF
    tokenizer directory (e.g. Mistral-7B-Instruct-v0.1's, or one saved by this function, in
    which case the specials already exist and keep their ids) or a ``tokenizer.model`` file.
    """
    from transformers import AddedToken

    tok = _load_base(path)
    # Special + unnormalised + no stripping: never split, and spaces around them stay text.
    new = [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False)
           for t in special_tokens(num_query_tokens)]
    added = tok.add_special_tokens({"extra_special_tokens": new}, replace_extra_special_tokens=False)
    logger.info("text tokenizer from %s: %d tokens (%d Divot specials added)",
                path or "mistral-common v1", len(tok), added)
    for t in special_tokens(num_query_tokens):
        ids = tok.encode(t, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"special token {t} encodes to {len(ids)} ids {ids}, expected one")
    return tok


def special_token_ids(tok, num_query_tokens: int = NUM_QUERY_TOKENS) -> dict:
    """Ids of the Divot specials: the six delimiters by token string, ``bos``/``eos``, and
    ``query`` → tuple of the query-token ids in order."""
    names = [VID_START, VID_END, FRAME_START, FRAME_END, IMG_START, IMG_END]
    ids = {name: tok.convert_tokens_to_ids(name) for name in names}
    ids["query"] = tuple(tok.convert_tokens_to_ids(query_tokens(num_query_tokens)))
    ids["bos"], ids["eos"] = tok.bos_token_id, tok.eos_token_id
    unk = tok.unk_token_id
    missing = [k for k, v in ids.items() if v is None or v == unk or (k == "query" and unk in v)]
    if missing:
        raise ValueError(f"tokenizer lacks Divot special tokens {missing}; load it with load_text_tokenizer")
    return ids


def video_placeholder_text(num_clips: int, num_query_tokens: int = NUM_QUERY_TOKENS) -> str:
    """``<vid>`` + (``<frame>`` + placeholders + ``</frame>``) × clips + ``</vid>``."""
    clip = FRAME_START + "".join(query_tokens(num_query_tokens)) + FRAME_END
    return VID_START + clip * num_clips + VID_END


def query_block_ids(tok, num_query_tokens: int = NUM_QUERY_TOKENS) -> list[int]:
    """``<frame>`` + query tokens + ``</frame>``: what inference appends once the model wrote ``<vid>``."""
    ids = special_token_ids(tok, num_query_tokens)
    return [ids[FRAME_START], *ids["query"], ids[FRAME_END]]


@dataclass(frozen=True)
class Turn:
    """One user message and (optionally) its reply.

    ``num_clips`` clips are shown before the user's text (DESIGN.md §4). The reply is the text
    ``reply`` (supervised, closed by ``</s>``) and/or, with ``reply_video``, a generated video
    ``<vid><frame>`` + queries + ``</frame></vid>`` (DESIGN.md §4 writes no ``</s>`` after it).
    A turn with neither is an open prompt; only the last turn may be open.
    """
    user: str
    num_clips: int = 0
    reply: str | None = None
    reply_video: bool = False

    @property
    def is_open(self) -> bool:
        return self.reply is None and not self.reply_video


@dataclass(frozen=True)
class EncodedPrompt:
    """One sequence. All tensors are 1-D of length L.

    ``labels`` is ``input_ids`` where supervised, ``IGNORE_INDEX`` elsewhere (HF shifts it).
    ``clip_mask``: placeholders to overwrite with projected Divot tokens, clip-major
    (``embeds[clip_mask] = rearrange(proj(tokens), 'c n d -> (c n) d')``).
    ``query_mask``: the generation query block(s), read out by the GMM head.
    """
    input_ids: torch.Tensor
    labels: torch.Tensor
    clip_mask: torch.Tensor
    query_mask: torch.Tensor
    num_clips: int
    num_query_blocks: int


def _user_text(turn: Turn, num_query_tokens: int) -> str:
    video = video_placeholder_text(turn.num_clips, num_query_tokens) if turn.num_clips else ""
    return f"[INST] {video}{turn.user} [/INST]\n"


def _encode_user(tok, turn: Turn, ids: dict, num_query_tokens: int) -> tuple[list[int], list[bool]]:
    text_ids = tok.encode(_user_text(turn, num_query_tokens), add_special_tokens=False)
    query = set(ids["query"])
    clip = [t in query for t in text_ids]
    if sum(clip) != turn.num_clips * num_query_tokens:
        # Also catches special tokens typed inside the user's text.
        raise ValueError(f"user message holds {sum(clip)} placeholders, expected "
                         f"{turn.num_clips} clips × {num_query_tokens}: {turn.user!r}")
    return text_ids, clip


def _encode_reply_text(tok, user_text: str, user_ids: list[int], reply: str) -> list[int]:
    """The reply's ids as they come when tokenized right after ``[/INST]\n``.

    Encoded on its own, "red" would become "▁red" (SentencePiece's prefix space); written
    after the newline, as the pretrained model reads running text, it is "red". The newline
    is a byte token that never merges onward, so the joint encoding splits cleanly; if it
    ever does not, fall back to the separate encoding.
    """
    joint = tok.encode(user_text + reply, add_special_tokens=False)
    if joint[:len(user_ids)] == user_ids:
        return joint[len(user_ids):]
    logger.debug("reply does not split cleanly after its prompt; encoding it alone: %r", reply)
    return tok.encode(reply, add_special_tokens=False)


def _encode_reply(tok, turn: Turn, ids: dict, user_text: str,
                  user_ids: list[int]) -> tuple[list[int], list[int], list[bool]]:
    """(reply ids, labels, query mask) of one reply."""
    out, labels, query = [], [], []
    if turn.reply is not None:
        text = _encode_reply_text(tok, user_text, user_ids, turn.reply) if turn.reply else []
        if set(text) & set(ids["query"]):
            raise ValueError(f"reply text contains query tokens: {turn.reply!r}")
        out += text
        labels += text
        query += [False] * len(text)
    if turn.reply_video:
        q = list(ids["query"])
        block = [ids[VID_START], ids[FRAME_START], *q, ids[FRAME_END], ids[VID_END]]
        # Supervise <vid> (the model must decide to open a video), <frame> and </vid>
        # (predicted from causal positions). The queries themselves are appended, never
        # predicted, and </frame> would be predicted from the last query, whose hidden state
        # belongs to the GMM head: both are ignored.
        block_labels = [ids[VID_START], ids[FRAME_START], *[IGNORE_INDEX] * len(q), IGNORE_INDEX, ids[VID_END]]
        out += block
        labels += block_labels
        query += [False, False, *[True] * len(q), False, False]
    else:
        out.append(ids["eos"])
        labels.append(ids["eos"])
        query.append(False)
    return out, labels, query


def encode_chat(tok, turns: Sequence[Turn], num_query_tokens: int = NUM_QUERY_TOKENS) -> EncodedPrompt:
    """``<s>[INST] u1 [/INST]\\nr1</s>[INST] u2 [/INST]\\n…``: the Mistral-instruct chat layout
    with Divot's newline after ``[/INST]``. Only replies are supervised."""
    if not turns:
        raise ValueError("encode_chat needs at least one turn")
    for t in turns[:-1]:
        if t.is_open:
            raise ValueError(f"only the last turn may lack a reply: {t.user!r}")
    ids = special_token_ids(tok, num_query_tokens)
    input_ids, labels, clip, query = [ids["bos"]], [IGNORE_INDEX], [False], [False]
    for turn in turns:
        user_ids, user_clip = _encode_user(tok, turn, ids, num_query_tokens)
        input_ids += user_ids
        labels += [IGNORE_INDEX] * len(user_ids)
        clip += user_clip
        query += [False] * len(user_ids)
        if turn.is_open:
            continue
        reply_ids, reply_labels, reply_query = _encode_reply(
            tok, turn, ids, _user_text(turn, num_query_tokens), user_ids)
        input_ids += reply_ids
        labels += reply_labels
        clip += [False] * len(reply_ids)
        query += reply_query
    return EncodedPrompt(
        input_ids=torch.tensor(input_ids, dtype=torch.long),
        labels=torch.tensor(labels, dtype=torch.long),
        clip_mask=torch.tensor(clip, dtype=torch.bool),
        query_mask=torch.tensor(query, dtype=torch.bool),
        num_clips=sum(t.num_clips for t in turns),
        num_query_blocks=sum(t.reply_video for t in turns),
    )


def encode_comprehension(tok, question: str, answer: str | None = None, num_clips: int = 1,
                         num_query_tokens: int = NUM_QUERY_TOKENS,
                         history: Sequence[Turn] = ()) -> EncodedPrompt:
    """Video QA sample; ``answer`` None gives the inference prompt ending in ``[/INST]\\n``."""
    return encode_chat(tok, [*history, Turn(question, num_clips=num_clips, reply=answer)], num_query_tokens)


def encode_generation(tok, caption: str, with_video: bool = True,
                      num_query_tokens: int = NUM_QUERY_TOKENS) -> EncodedPrompt:
    """Caption→video sample; ``with_video=False`` gives the prompt inference starts from
    (generate text until ``<vid>``, then append :func:`query_block_ids`)."""
    user = GENERATION_INSTRUCTION.format(caption=caption)
    return encode_chat(tok, [Turn(user, reply_video=with_video)], num_query_tokens)


def pad_batch(items: Sequence[EncodedPrompt], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Stack sequences to (b, L): ``input_ids`` padded with ``pad_id``, labels with
    ``IGNORE_INDEX``, masks with False, plus ``attention_mask`` (1 = real token)."""
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    length = max(len(it.input_ids) for it in items)
    fields = {"input_ids": pad_id, "labels": IGNORE_INDEX, "clip_mask": False, "query_mask": False}
    out: dict[str, list[torch.Tensor]] = {k: [] for k in [*fields, "attention_mask"]}
    for it in items:
        n = length - len(it.input_ids)
        for name, value in fields.items():
            seq = getattr(it, name)
            pad = torch.full((n,), value, dtype=seq.dtype)
            out[name].append(torch.cat([seq, pad] if padding_side == "right" else [pad, seq]))
        real = torch.ones(len(it.input_ids), dtype=torch.long)
        pad = torch.zeros(n, dtype=torch.long)
        out["attention_mask"].append(torch.cat([real, pad] if padding_side == "right" else [pad, real]))
    return {k: torch.stack(v) for k, v in out.items()}
