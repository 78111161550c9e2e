"""The user-facing Divot API: load a trained Divot-LLM with its tokenizer and de-tokenizer,
answer questions about videos, generate videos from text, and chat (DESIGN.md §4).

    import divot
    pipe = divot.load()                                   # newest trained checkpoint under runs/
    pipe.answer("What happens in the video?", "clip.mp4")  # → str
    pipe.generate_video("a red circle moves to the left", seed=0).save("out.mp4")
    divot.generate("a red circle moves to the left", output="out.mp4")   # one call, cached (llm/api.py)

A checkpoint directory is what ``training/train_llm.py`` writes (``runs/llm_<stage>/final``
or ``runs/llm_pretrain/merged``); its ``pipeline.json`` names the frozen Divot tokenizer and
the de-tokenizer trained with it. Videos enter as 2-second clips (:mod:`llm.chat`), at most
``max_clips`` per video. Every input video is decoded before any model runs, so a bad file
fails fast, naming itself; a prompt that does not fit the context fails before any model runs
too (:class:`PromptTooLongError`).

Axis glossary: c = clips, f = frames, n = tokens per clip (64), d = Divot token width,
s = frame side.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from divot.detokenizer import DivotDetokenizer
from divot.long_video import DEFAULT_OVERLAP, clips_needed, extend_video
from divot.modeling import CheckpointError
from divot.tokenizer import DivotTokenizer
from divot.video_io import CLIP_FPS, CLIP_FRAMES, to_uint8
from llm.chat import (ChatTurn, Conversation, GeneratedVideo, TextStream, Video, array_clips, as_video_list,
                      decode_text, file_clips)
from llm.features import tokenizer_frame_size
from llm.model import DivotLLM
from llm.text_tokenizer import GENERATION_INSTRUCTION, VID_START, EncodedPrompt

logger = logging.getLogger(__name__)

PIPELINE_FILE = "pipeline.json"
DEFAULT_CHECKPOINTS = ("runs/llm_sft_comp/final", "runs/llm_sft_gen/final", "runs/llm_pretrain/final")
# Prompt-to-video prefers the generation fine-tune (the comprehension one kept the pretrain GMM head).
GENERATION_CHECKPOINTS = ("runs/llm_sft_gen/final", "runs/llm_pretrain/final", "runs/llm_sft_comp/final")
DEFAULT_MAX_CLIPS = 8  # per video at inference (training reads up to 4)
REPO_ROOT = Path(__file__).resolve().parents[1]
_GENERATION_PREFIX = GENERATION_INSTRUCTION.split("{caption}")[0]  # "Generate a video of "
# Keywords that only matter once the model writes a video (chat) — see DivotPipeline._video.
VIDEO_OPTIONS = ("steps", "guidance_scale", "guidance_rescale", "sampler", "variance_scale", "use_mean", "callback",
                 "seconds", "overlap", "known_method", "guidance_weight")
_TRAIN_HINT = ("train one first:\n"
               "  accelerate launch training/pretrain_tokenizer.py          # the Divot tokenizer\n"
               "  accelerate launch training/train_llm.py --stage pretrain\n"
               "  accelerate launch training/train_llm.py --stage sft-comp  # video QA / chat\n"
               "  accelerate launch training/train_llm.py --stage sft-gen   # video generation\n"
               "or pass checkpoint=DIR (scripts: --checkpoint DIR)")


class PromptTooLongError(ValueError):
    """The prompt (history, clips and message) does not fit the model's context."""


# ------------------------------------------------------------------ loading
def find_checkpoint(roots: Sequence[str | os.PathLike] | None = None,
                    candidates: Sequence[str] = DEFAULT_CHECKPOINTS) -> Path:
    """The first existing of ``candidates`` (:data:`DEFAULT_CHECKPOINTS`, or
    :data:`GENERATION_CHECKPOINTS` for prompt-to-video) under ``roots`` (default: the working
    directory, then the source checkout)."""
    roots = list(dict.fromkeys(Path(r).resolve() for r in ([Path.cwd(), REPO_ROOT] if roots is None else roots)))
    for rel in candidates:
        for root in roots:
            if (root / rel).is_dir():
                logger.info("using Divot-LLM checkpoint %s", root / rel)
                return root / rel
    looked = ", ".join(str(r / rel) for r in roots for rel in candidates)
    raise CheckpointError(f"no Divot-LLM checkpoint found (looked for {looked}); {_TRAIN_HINT}")


def read_pipeline_file(checkpoint: str | os.PathLike) -> dict[str, str | None]:
    """``{"tokenizer": dir, "detokenizer": dir | None}`` from the checkpoint's pipeline.json
    (relative paths resolve against the checkpoint); empty when the file is absent."""
    path = Path(checkpoint) / PIPELINE_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc.msg})") from exc
    unexpected = sorted(set(data) - {"tokenizer", "detokenizer"}) if isinstance(data, dict) else None
    if unexpected is None or unexpected or not data.get("tokenizer"):
        raise CheckpointError(f"{path}: expected {{\"tokenizer\": DIR, \"detokenizer\": DIR or null}}; "
                              f"got {data!r}" + (f" (unexpected keys {unexpected})" if unexpected else ""))
    return {k: None if data.get(k) is None else str(Path(checkpoint) / data[k]) for k in ("tokenizer", "detokenizer")}


def _torch_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. torch.bfloat16 or 'bfloat16'")
    return value


def _check_fits(model: DivotLLM, part, what: str, source: str) -> None:
    cfg = part.config
    want = (model.config.num_query_tokens, model.config.token_dim)
    if (cfg.num_tokens, cfg.token_dim) != want:
        raise CheckpointError(f"{what} {source} makes {cfg.num_tokens}×{cfg.token_dim} tokens but the LLM "
                              f"reads and writes {want[0]}×{want[1]}; they were not trained together")


def load(checkpoint: str | os.PathLike | None = None, *, tokenizer: str | os.PathLike | None = None,
         detokenizer: str | os.PathLike | None = None, device: str | torch.device | None = None,
         dtype: torch.dtype | str | None = None, max_clips: int = DEFAULT_MAX_CLIPS) -> "DivotPipeline":
    """Divot-LLM + the frozen Divot tokenizer + the de-tokenizer, ready for inference.

    ``checkpoint`` None picks :func:`find_checkpoint`. ``tokenizer`` / ``detokenizer``
    override the directories named in the checkpoint's ``pipeline.json``. A de-tokenizer that
    is not there only fails when a video must be decoded. ``device`` defaults to CUDA when
    available; ``dtype`` (e.g. ``torch.bfloat16`` for a 7B model) applies to the LLM only —
    the tokenizer and de-tokenizer stay float32.
    """
    ckpt = find_checkpoint() if checkpoint is None else Path(checkpoint)
    if not ckpt.is_dir():
        raise CheckpointError(f"Divot-LLM checkpoint directory {ckpt} does not exist; {_TRAIN_HINT}")
    named = read_pipeline_file(ckpt)
    tok_dir = tokenizer if tokenizer is not None else named.get("tokenizer")
    if tok_dir is None:
        raise CheckpointError(f"{ckpt} has no {PIPELINE_FILE} naming its Divot tokenizer; pass tokenizer=DIR "
                              f"(e.g. runs/tokenizer/tokenizer)")
    detok_dir = detokenizer if detokenizer is not None else named.get("detokenizer")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _torch_dtype(dtype)  # a bad name fails before the slow loads
    divot_tok = DivotTokenizer.from_pretrained(tok_dir)
    model = DivotLLM.from_pretrained(ckpt)
    _check_fits(model, divot_tok, "Divot tokenizer", str(tok_dir))
    model.to(device=device, dtype=dtype)
    detok, missing = None, None
    if detok_dir is None:
        missing = f"{ckpt} names no de-tokenizer; pass detokenizer=DIR to divot.load (e.g. runs/tokenizer/detokenizer)"
    elif not Path(detok_dir).is_dir():
        missing = f"de-tokenizer directory {detok_dir} does not exist; pass detokenizer=DIR to divot.load"
    else:
        detok = DivotDetokenizer.from_pretrained(detok_dir)
        _check_fits(model, detok, "de-tokenizer", str(detok_dir))
    if missing:
        logger.warning("%s: text answers work, video generation will fail", missing)
    logger.info("loaded Divot pipeline: LLM %s, tokenizer %s, de-tokenizer %s on %s", ckpt, tok_dir, detok_dir, device)
    return DivotPipeline(model, divot_tok, detok, frame_size=tokenizer_frame_size(tok_dir), max_clips=max_clips,
                         missing_detokenizer=missing, device=device, checkpoint=ckpt)


def _seconds_to_frames(seconds: float | None) -> int | None:
    """Frames at 8 fps for a requested length (None: one clip as the model makes it)."""
    if seconds is None:
        return None
    if not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds!r}")
    return max(1, round(seconds * CLIP_FPS))


# ------------------------------------------------------------------ the pipeline
class DivotPipeline:
    """A loaded Divot-LLM (``model``), Divot ``tokenizer`` and ``detokenizer`` (may be None).

    Inference only: every part is in eval mode with gradients off, and the LLM's LoRA is merged
    into its base weights (peft ``merge_adapter``; ``model.lm.unmerge_adapter()`` undoes it).
    ``checkpoint`` is the directory the LLM came from (None when built from modules); ``last_prompt`` is the
    :class:`~llm.text_tokenizer.EncodedPrompt` of the most recent call, for inspection.
    """

    def __init__(self, model: DivotLLM, tokenizer: DivotTokenizer, detokenizer: DivotDetokenizer | None = None,
                 *, frame_size: int | None = None, max_clips: int = DEFAULT_MAX_CLIPS,
                 missing_detokenizer: str | None = None, device: str | torch.device | None = None,
                 checkpoint: str | os.PathLike | None = None):
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.device = torch.device(device) if device is not None else model.device
        self.model = model.to(self.device).eval().requires_grad_(False)
        # Fold the LoRA into the base weights (W ← W + (α/r)·BA): the adapters stay attached but
        # no longer run, so each decoded token skips 7 small matmul chains per layer.
        with torch.no_grad():
            self.model.lm.merge_adapter()
        self.tokenizer = tokenizer.to(self.device).eval().requires_grad_(False)
        self.detokenizer = None if detokenizer is None else detokenizer.to(self.device).eval().requires_grad_(False)
        self.frame_size = int(frame_size or tokenizer.config.vit.img_size)
        self.max_clips = int(max_clips)
        self._missing_detokenizer = missing_detokenizer or "this pipeline was built without a de-tokenizer"
        self.text_tokenizer = model.text_tokenizer
        self._ids = model.special_ids
        self._conversation = Conversation(model.config.num_query_tokens)
        self.last_prompt: EncodedPrompt | None = None

    # -------------------------------------------------------------- videos → tokens
    def read_videos(self, videos: Video | Sequence[Video] | None) -> torch.Tensor:
        """Pixels of every clip of ``videos`` (c, 16, 3, s, s) in [-1, 1]; reads them all."""
        clips = []
        for video in as_video_list(videos):
            if isinstance(video, (str, os.PathLike)):
                clips.append(file_clips(video, self.frame_size, self.max_clips))
            elif isinstance(video, (torch.Tensor, np.ndarray)):
                clips.append(array_clips(video, self.frame_size, self.max_clips))
            else:
                raise TypeError(f"a video is a path, a tensor or an array; got {type(video).__name__}")
        return torch.cat(clips) if clips else torch.zeros(0, CLIP_FRAMES, 3, self.frame_size, self.frame_size)

    @torch.no_grad()
    def tokenize(self, pixels: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """(c, f, 3, s, s) clips → (c, n, d) float32 Divot tokens on the CPU."""
        cfg = self.tokenizer.config
        out = [torch.zeros(0, cfg.num_tokens, cfg.token_dim)]
        dtype = next(self.tokenizer.parameters()).dtype
        for start in range(0, pixels.shape[0], batch_size):
            out.append(self.tokenizer.encode(pixels[start:start + batch_size].to(self.device, dtype)).float().cpu())
        return torch.cat(out)

    def encode_videos(self, videos: Video | Sequence[Video] | None) -> torch.Tensor:
        """(c, n, d) Divot tokens of every clip of ``videos``."""
        return self.tokenize(self.read_videos(videos))

    # -------------------------------------------------------------- helpers
    def _room(self, prompt: EncodedPrompt, wanted: int, needed: int = 1) -> int:
        """New tokens that fit after ``prompt``: ``wanted`` or fewer, at least ``needed``."""
        limit, length = self.model.config.max_position_embeddings, len(prompt.input_ids)
        if length + needed > limit:
            raise PromptTooLongError(
                f"prompt too long: {length} tokens (with {prompt.num_clips} clips of "
                f"{self.model.config.num_query_tokens + 2} tokens each) + {needed} to generate is "
                f"{length + needed - limit} more than the model's context of {limit} tokens; shorten the "
                f"message, show fewer or shorter videos, or reset() the chat")
        room = limit - length
        if wanted > room:
            logger.warning("max_new_tokens %d cut to %d to fit the context of %d", wanted, room, limit)
        return min(wanted, room)

    def _generators(self, seed: int | None) -> tuple[torch.Generator | None, torch.Generator | None]:
        """(LLM sampling generator on the CPU, de-tokenizer noise generator on the device)."""
        if seed is None:
            return None, None
        return torch.Generator().manual_seed(seed), torch.Generator(self.device).manual_seed(seed)

    def _require_detokenizer(self) -> DivotDetokenizer:
        if self.detokenizer is None:
            raise CheckpointError(f"cannot decode a video: {self._missing_detokenizer}")
        return self.detokenizer

    def _video(self, prompt: EncodedPrompt, clip_tokens: torch.Tensor, text: str,
               generators: tuple, steps: int = 25, guidance_scale: float = 3.0, guidance_rescale: float = 0.7,
               sampler: str = "ddim", variance_scale: float | None = None, use_mean: bool = False,
               callback: Callable[[int, int], None] | None = None, seconds: float | None = None,
               overlap: int = DEFAULT_OVERLAP, known_method: str = "guidance",
               guidance_weight: float = 2.0) -> GeneratedVideo:
        """Query block after ``prompt`` (ending at or before ``<vid>``) → GMM → tokens → frames.
        Longer than one clip (``seconds``): one GMM sample per clip, joined by
        :func:`divot.long_video.extend_video` (each clip continues the last ``overlap`` frames)."""
        detok = self._require_detokenizer()
        self._room(prompt, 0, needed=self.model.config.num_query_tokens + 2)
        num_frames = _seconds_to_frames(seconds)
        num_clips = 1 if num_frames is None else clips_needed(num_frames, detok.config.num_frames, overlap)
        llm_gen, detok_gen = generators
        tokens = torch.stack([self.model.generate_video_tokens(
            prompt.input_ids, prompt.clip_mask, clip_tokens, variance_scale=variance_scale, use_mean=use_mean,
            generator=llm_gen, query_mask=prompt.query_mask) for _ in range(num_clips)])
        decode_kw = dict(steps=steps, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                         sampler=sampler, generator=detok_gen, callback=callback)
        if num_clips == 1:
            tokens = tokens[0]
            frames = detok.decode(tokens[None].to(self.device, torch.float32), **decode_kw)[0]
        else:
            frames = extend_video(detok, tokens, overlap, known_method, guidance_weight=guidance_weight, **decode_kw)
        frames = frames if num_frames is None else frames[:num_frames]
        return GeneratedVideo(frames=to_uint8(frames), tokens=tokens.float().cpu(), fps=CLIP_FPS, text=text)

    def _reply(self, conversation: Conversation, message: str, videos, *, allow_video: bool,
               max_new_tokens: int = 128, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
               seed: int | None = None, stream: Callable[[str], None] | None = None, **video_kw) -> ChatTurn:
        """Text until ``</s>`` or ``<vid>``; with ``allow_video``, a ``<vid>`` goes on to a video."""
        unknown = sorted(set(video_kw) - set(VIDEO_OPTIONS))
        if unknown:  # checked now: a text reply would otherwise never notice a misspelt option
            raise TypeError(f"unexpected keyword argument(s) {unknown}; video options are {list(VIDEO_OPTIONS)}")
        pixels = self.read_videos(videos)  # every file decoded before any model work
        prompt = conversation.encode(self.text_tokenizer, message, pixels.shape[0])
        self.last_prompt = prompt
        max_new = self._room(prompt, max_new_tokens)
        new_clips = self.tokenize(pixels)
        clip_tokens = conversation.clip_tokens(new_clips)
        generators = self._generators(seed)
        stops = (self._ids["eos"], self._ids[VID_START])
        streamer = TextStream(self.text_tokenizer, stream, skip_ids=stops) if stream is not None else None
        new = self.model.generate_text(
            prompt.input_ids, prompt.clip_mask, clip_tokens, max_new_tokens=max_new, do_sample=do_sample,
            temperature=temperature, top_p=top_p, generator=generators[0], stop_ids=stops, on_token=streamer,
            query_mask=prompt.query_mask)
        if streamer is not None:
            streamer.finish()
        wrote_video = bool(new) and new[-1] == self._ids[VID_START]
        text = decode_text(self.text_tokenizer, [t for t in new if t not in stops]).strip()
        if not wrote_video:
            return ChatTurn(message, new_clips, reply=text)
        if not allow_video:
            logger.info("the model started a video; answer() returns the text before it (chat() decodes it)")
            return ChatTurn(message, new_clips, reply=text)
        continued = EncodedPrompt(
            input_ids=torch.cat([prompt.input_ids, torch.tensor(new, dtype=torch.long)]), labels=prompt.labels,
            clip_mask=F.pad(prompt.clip_mask, (0, len(new))), query_mask=F.pad(prompt.query_mask, (0, len(new))),
            num_clips=prompt.num_clips, num_query_blocks=prompt.num_query_blocks)
        video = self._video(continued, clip_tokens, text, generators, **video_kw)
        return ChatTurn(message, new_clips, reply=text, video=video)

    # -------------------------------------------------------------- public API
    def answer(self, question: str, videos: Video | Sequence[Video] | None = None, *, max_new_tokens: int = 128,
               do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
               stream: Callable[[str], None] | None = None) -> str:
        """The model's text answer to ``question`` about ``videos`` (a path, a tensor, or a list).
        ``stream`` receives the answer piece by piece as it is generated."""
        return self._reply(Conversation(self.model.config.num_query_tokens), question, videos, allow_video=False,
                           max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                           top_p=top_p, seed=seed, stream=stream).reply

    def generate_video(self, prompt: str, *, videos: Video | Sequence[Video] | None = None, seed: int | None = None,
                       steps: int = 25, guidance_scale: float = 3.0, guidance_rescale: float = 0.7,
                       sampler: str = "ddim", variance_scale: float | None = None, use_mean: bool = False,
                       output: str | os.PathLike | None = None,
                       callback: Callable[[int, int], None] | None = None, seconds: float | None = None,
                       overlap: int = DEFAULT_OVERLAP, known_method: str = "guidance",
                       guidance_weight: float = 2.0) -> GeneratedVideo:
        """A 2-second video of ``prompt``, asked as in training (``Generate a video of …``)
        with ``<vid>`` forced. ``variance_scale`` (default the model's, 0.1) scales the GMM
        sampling variance, ``use_mean`` takes the mixture mean instead; the de-tokenizer then
        runs ``steps`` of ``sampler`` with classifier-free guidance. ``output`` saves it.

        ``seconds`` (default None: one 2-second clip) asks for a longer (or shorter) video at
        8 fps: the GMM is sampled once per 2-second clip and each clip after the first
        continues the last ``overlap`` frames of the one before, by ``known_method``
        ("guidance": VDM reconstruction guidance with weight ``guidance_weight``;
        "replacement"; "clean"). ``tokens`` is then (clips, n, d)."""
        self._require_detokenizer()
        _seconds_to_frames(seconds)  # a bad length fails before any model work
        text = prompt.strip()
        if not text.lower().startswith(_GENERATION_PREFIX.lower()):
            text = GENERATION_INSTRUCTION.format(caption=text)
        pixels = self.read_videos(videos)
        encoded = Conversation(self.model.config.num_query_tokens).encode(self.text_tokenizer, text, pixels.shape[0])
        self.last_prompt = encoded
        self._room(encoded, 0, needed=self.model.config.num_query_tokens + 2)  # before any model work
        video = self._video(encoded, self.tokenize(pixels), "", self._generators(seed), steps=steps,
                            guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, sampler=sampler,
                            variance_scale=variance_scale, use_mean=use_mean, callback=callback, seconds=seconds,
                            overlap=overlap, known_method=known_method, guidance_weight=guidance_weight)
        if output is not None:
            video.save(output)
        return video

    def chat(self, message: str, videos: Video | Sequence[Video] | None = None, **kw) -> str | GeneratedVideo:
        """Next reply of the conversation: text, or a :class:`GeneratedVideo` when the model
        writes ``<vid>``. ``videos`` are shown with this message; earlier turns (text, clips,
        generated videos) stay in the prompt until :meth:`reset`. Keywords: those of
        :meth:`answer`, and for a generated video those of :meth:`generate_video` but ``output``."""
        turn = self._reply(self._conversation, message, videos, allow_video=True, **kw)
        self._conversation.append(turn)
        return turn.video if turn.video is not None else turn.reply

    @property
    def history(self) -> tuple[ChatTurn, ...]:
        return self._conversation.turns

    def reset(self) -> None:
        """Forget the conversation."""
        self._conversation.reset()
