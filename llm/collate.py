"""Samples (:mod:`llm.data_sources`) → the Divot-LLM batch the model consumes.

The batch contract (fixed; :class:`llm.model.DivotLLM` reads exactly this)::

    input_ids      LongTensor (b, L), right-padded with the pad id (see :func:`pad_token_id`)
    attention_mask LongTensor (b, L), 1 = real token
    labels         LongTensor (b, L), -100 where not supervised (HF shifts internally)
    clip_mask      BoolTensor (b, L), True at clip placeholders (t per clip)
    clip_tokens    FloatTensor (c, t, d), clips in row-major order of clip_mask
    query_mask     BoolTensor (b, L), True at generation query positions
    target_tokens  FloatTensor (g, t, d), one per query block, row-major order of query_mask
    task           list[str] of length b
    num_corrupt    int, corrupt_paths list[str]: dropped unreadable samples

A batch whose samples were all unreadable has b = 0 (``input_ids`` of shape (0, 0)); the
training loop skips it. Sequences longer than ``max_length`` raise a ValueError naming the
sample: cutting one would cut a clip, a query block or a reply's ``</s>``, none of them safe,
so the data must be fixed instead (e.g. a lower ``max_clips``). The collator runs in the main
process (``num_workers=0``) so the tokenizer and the features need no pickling.

Axis glossary: b = samples, L = padded length, c = clips in the batch, g = query blocks in
the batch, t = tokens per clip (64), d = Divot token width.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from divot.video_io import VideoReadError
from llm.features import ClipFeatures
from llm.text_tokenizer import NUM_QUERY_TOKENS, EncodedPrompt, encode_chat, pad_batch

logger = logging.getLogger(__name__)

SAMPLE_KEYS = ("task", "turns", "videos", "target_video")


def pad_token_id(tok) -> int:
    """The tokenizer's pad id; Mistral's has none, so ``<unk>`` pads (any id works: padded
    positions are masked out of attention and labels)."""
    for pad in (tok.pad_token_id, tok.unk_token_id, tok.eos_token_id):
        if pad is not None:
            return int(pad)
    raise ValueError("tokenizer has no pad, unk or eos token to pad with")


def describe_sample(sample: dict) -> str:
    turns = sample.get("turns") or []
    first = turns[0].user if turns else ""
    short = first[:60] + ("…" if len(first) > 60 else "")
    return f"{sample.get('task', '?')} sample (first message {short!r})"


class LLMCollator:
    """``collate(samples) -> batch``: encode turns, pad, fetch clip and target tokens."""

    def __init__(self, text_tokenizer, features: ClipFeatures, num_query_tokens: int = NUM_QUERY_TOKENS,
                 max_length: int | None = None, pad_id: int | None = None):
        if features.num_tokens != num_query_tokens:
            raise ValueError(f"features give {features.num_tokens} tokens per clip but the prompt "
                             f"has {num_query_tokens} placeholders per clip")
        self.tok, self.features = text_tokenizer, features
        self.num_query_tokens, self.max_length = num_query_tokens, max_length
        self.pad_id = pad_token_id(text_tokenizer) if pad_id is None else int(pad_id)

    def encode(self, sample: dict) -> EncodedPrompt:
        """One sample's sequence; checks it against its refs and ``max_length``."""
        missing = [k for k in SAMPLE_KEYS if k not in sample]
        if missing:
            raise ValueError(f"sample lacks keys {missing} (has {sorted(sample)})")
        enc = encode_chat(self.tok, sample["turns"], self.num_query_tokens)
        targets = int(sample["target_video"] is not None)
        if enc.num_clips != len(sample["videos"]) or enc.num_query_blocks != targets:
            raise ValueError(f"{describe_sample(sample)}: turns hold {enc.num_clips} clips and "
                             f"{enc.num_query_blocks} video replies but the sample has "
                             f"{len(sample['videos'])} videos and {targets} target")
        if self.max_length is not None and len(enc.input_ids) > self.max_length:
            raise ValueError(f"{describe_sample(sample)} is {len(enc.input_ids)} tokens, longer than "
                             f"max_length {self.max_length}; lower max_clips or raise max_length")
        return enc

    def _features(self, samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """(clip tokens, target tokens) of ``samples``, from one feature call."""
        refs = [r for s in samples for r in s["videos"]]
        targets = [s["target_video"] for s in samples if s["target_video"] is not None]
        tokens = self.features(refs + targets)
        return tokens[:len(refs)], tokens[len(refs):]

    def _tokens(self, samples: list[dict]) -> tuple[list[int], torch.Tensor, torch.Tensor, list[str]]:
        """(indices of readable samples, clip tokens, target tokens, unreadable paths).

        A video whose metadata read fine may still fail to decode; then retry sample by
        sample to find and drop the bad ones (rare, so the common case stays one call).
        """
        try:
            return list(range(len(samples))), *self._features(samples), []
        except VideoReadError:
            pass
        keep, clips, gens, bad = [], [], [], []
        for i, sample in enumerate(samples):
            try:
                c, g = self._features([sample])
            except VideoReadError as exc:
                logger.warning("dropping %s: %s", describe_sample(sample), exc)
                bad.append(exc.path)
                continue
            keep.append(i)
            clips.append(c)
            gens.append(g)
        return keep, self._cat(clips), self._cat(gens), bad

    def _cat(self, parts: list[torch.Tensor]) -> torch.Tensor:
        if parts:
            return torch.cat(parts)
        return torch.zeros(0, self.features.num_tokens, self.features.token_dim)

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        good = [s for s in samples if "corrupt" not in s]
        corrupt = [s["corrupt"] for s in samples if "corrupt" in s]
        encoded = [self.encode(s) for s in good]  # errors before any pixel is decoded
        keep, clip_tokens, target_tokens, unreadable = self._tokens(good)
        corrupt += unreadable
        if keep:
            batch = pad_batch([encoded[i] for i in keep], self.pad_id, padding_side="right")
        else:
            empty = torch.zeros(0, 0, dtype=torch.long)
            batch = {"input_ids": empty, "attention_mask": empty.clone(), "labels": empty.clone(),
                     "clip_mask": empty.bool(), "query_mask": empty.bool()}
        batch.update(clip_tokens=clip_tokens, target_tokens=target_tokens,
                     task=[good[i]["task"] for i in keep], num_corrupt=len(corrupt), corrupt_paths=corrupt)
        return batch
