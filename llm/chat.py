"""What goes into and comes out of a Divot-LLM conversation: videos as 2-second clips, the
turns with their clip tokens, and the two kinds of reply.

Videos enter as 2-second clips of 16 frames at 8 fps: files through
:func:`llm.data_sources.file_clip_refs` and :func:`llm.features.read_ref_pixels`, exactly as
in training; tensors are taken to be 8 fps already. At most ``max_clips`` clips per video,
spread over a longer one as :func:`divot.video_io.read_clips` spreads them.

A :class:`Conversation` keeps every earlier turn (the user's text, the Divot tokens of the
clips shown with it, the reply) and re-encodes the whole history with
:func:`llm.text_tokenizer.encode_chat` for each new message, so several videos can enter one
conversation across turns and a later question can refer to an earlier answer. A reply is
text, or a :class:`GeneratedVideo` when the model wrote ``<vid>`` (any text before it is kept
in ``GeneratedVideo.text``); a generated video stays in the history as its query block, the
way training writes it. :class:`TextStream` turns the ids the model emits into text pieces
for a ``stream`` callback.

Axis glossary: c = clips, n = tokens per clip (64), d = Divot token width,
f = frames, ch = RGB channels, h = height, w = width, s = frame side.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Union

import numpy as np
import torch
from einops import rearrange

from divot.video_io import CLIP_FPS, CLIP_FRAMES, VideoReadError, resize_center_crop, to_tensor, write_video
from llm.data_sources import file_clip_refs
from llm.features import read_ref_pixels
from llm.text_tokenizer import NUM_QUERY_TOKENS, EncodedPrompt, Turn, encode_chat

logger = logging.getLogger(__name__)

Video = Union[str, os.PathLike, torch.Tensor, np.ndarray]  # a file, or frames (see array_clips)


# ------------------------------------------------------------------ video input
def as_video_list(videos) -> list:
    if videos is None:
        return []
    if isinstance(videos, (str, os.PathLike, torch.Tensor, np.ndarray)):
        return [videos]
    return list(videos)


def _spread(n: int, max_clips: int) -> list[int]:
    """Indices of ``max_clips`` windows spread over ``n`` (first and last kept), as read_clips."""
    if n <= max_clips:
        return list(range(n))
    return np.unique(np.round(np.linspace(0, n - 1, max_clips)).astype(int)).tolist()


def array_clips(video: torch.Tensor | np.ndarray, frame_size: int, max_clips: int) -> torch.Tensor:
    """Float (f, 3, H, W) in [-1, 1] or uint8 (f, H, W, 3) frames at 8 fps → (c, 16, 3, s, s)
    2-second clips (the last padded with its final frame, at most ``max_clips`` spread ones)."""
    x = torch.as_tensor(video).detach().cpu()
    if x.ndim == 4 and x.shape[0] == 0:
        raise ValueError("video tensor has no frames")
    if x.ndim == 4 and x.dtype == torch.uint8 and x.shape[-1] == 3:
        frames = to_tensor(resize_center_crop(x.numpy(), frame_size))
    elif x.ndim == 4 and x.is_floating_point() and x.shape[1] == 3:
        if x.numel() and (x.min() < -1.01 or x.max() > 1.01):
            raise ValueError(f"float video values must lie in [-1, 1], got [{x.min():.3g}, {x.max():.3g}]")
        frames = resize_center_crop(x.float(), frame_size)
    else:
        raise ValueError(f"a video tensor must be float (f, 3, H, W) in [-1, 1] or uint8 (f, H, W, 3); "
                         f"got {x.dtype} {tuple(x.shape)}")
    count = math.ceil(frames.shape[0] / CLIP_FRAMES)
    frames = torch.cat([frames, frames[-1:].expand(count * CLIP_FRAMES - frames.shape[0], -1, -1, -1)])
    clips = rearrange(frames, "(c f) ch h w -> c f ch h w", f=CLIP_FRAMES)
    return clips[_spread(count, max_clips)]


def file_clips(path: str | os.PathLike, frame_size: int, max_clips: int) -> torch.Tensor:
    """A video file → (c, 16, 3, s, s) clips, read as training reads them; VideoReadError if unreadable."""
    try:
        refs = file_clip_refs(path, max_clips)
    except VideoReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure means "unreadable file"
        raise VideoReadError(path, f"{type(exc).__name__}: {exc}") from exc
    return torch.stack([to_tensor(p) for p in read_ref_pixels(refs, frame_size)])


@dataclass
class GeneratedVideo:
    """A video the model wrote: uint8 ``frames`` (f, h, w, 3) at ``fps``, the Divot ``tokens``
    (n, d) the GMM head sampled, and ``text`` the model wrote before ``<vid>``."""
    frames: np.ndarray
    tokens: torch.Tensor
    fps: float = CLIP_FPS
    text: str = ""
    path: Path | None = field(default=None, compare=False)  # where save() last wrote

    def save(self, path: str | os.PathLike) -> Path:
        """Write an mp4 (or webm/mkv/avi/mov) or, for ``.gif``, a looping GIF; returns the path."""
        self.path = write_video(path, self.frames, fps=self.fps)
        logger.info("wrote generated video to %s", self.path)
        return self.path


@dataclass(frozen=True)
class ChatTurn:
    """One finished exchange: the user's message, the tokens (c, n, d) of the clips shown with
    it, and the reply (``reply`` text, and ``video`` when the model generated one)."""
    user: str
    clip_tokens: torch.Tensor
    reply: str = ""
    video: GeneratedVideo | None = None

    @property
    def num_clips(self) -> int:
        return int(self.clip_tokens.shape[0])

    def as_turn(self) -> Turn:
        if self.video is not None:
            # Text before <vid> stays in the prompt; DESIGN.md §4 writes no </s> after a video.
            return Turn(self.user, num_clips=self.num_clips, reply=self.reply or None, reply_video=True)
        return Turn(self.user, num_clips=self.num_clips, reply=self.reply)


class Conversation:
    """The history of a chat; :meth:`encode` builds the prompt for the next message."""

    def __init__(self, num_query_tokens: int = NUM_QUERY_TOKENS):
        self.num_query_tokens = num_query_tokens
        self._turns: list[ChatTurn] = []

    @property
    def turns(self) -> tuple[ChatTurn, ...]:
        return tuple(self._turns)

    def __len__(self) -> int:
        return len(self._turns)

    def append(self, turn: ChatTurn) -> None:
        self._turns.append(turn)

    def reset(self) -> None:
        self._turns.clear()

    def encode(self, text_tokenizer, message: str, num_clips: int) -> EncodedPrompt:
        """All earlier turns, then ``message`` with ``num_clips`` new clips, open for the reply."""
        turns = [t.as_turn() for t in self._turns] + [Turn(message, num_clips=num_clips)]
        return encode_chat(text_tokenizer, turns, self.num_query_tokens)

    def clip_tokens(self, new: torch.Tensor) -> torch.Tensor:
        """(c, n, d) tokens of every clip in the prompt, in placeholder order: earlier turns'
        clips, then ``new`` (the next message's)."""
        return torch.cat([t.clip_tokens for t in self._turns] + [new.float().cpu()])


class TextStream:
    """Feeds a callback the text of generated ids as they arrive.

    The ids decoded so far are decoded again at each step and only the new characters are
    sent: SentencePiece pieces and byte tokens only make sense in context (a multi-byte
    character spans several byte tokens, which decode to "\ufffd" until the last arrives, so
    such a tail is held back until it completes or :meth:`finish` is called).
    """

    def __init__(self, text_tokenizer, callback: Callable[[str], None], skip_ids: Iterable[int] = ()):
        self.tok, self.callback, self.skip = text_tokenizer, callback, set(skip_ids)
        self.ids: list[int] = []
        self.sent = 0

    def __call__(self, token_id: int) -> None:
        if token_id in self.skip:
            return
        self.ids.append(int(token_id))
        self._emit(final=False)

    def finish(self) -> None:
        self._emit(final=True)

    def _emit(self, final: bool) -> None:
        text = decode_text(self.tok, self.ids)
        if not final and text.endswith("\ufffd"):
            return
        if len(text) > self.sent:
            self.callback(text[self.sent:])
            self.sent = len(text)


def decode_text(text_tokenizer, ids: Iterable[int]) -> str:
    """Reply text of generated ids, Divot specials and ``</s>`` dropped."""
    return text_tokenizer.decode(list(ids), skip_special_tokens=True)
