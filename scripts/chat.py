#!/usr/bin/env python
"""Chat with Divot-LLM about videos in the terminal; answers stream token by token.

    python scripts/chat.py --video clip.mp4 [--video other.mp4] [--checkpoint DIR] [--seed N]

Type a message and press Enter. Commands: ``/video PATH`` attaches a video to your next
message, ``/reset`` forgets the conversation, ``/quit`` (or Ctrl-D / Ctrl-C) leaves. The
``--video`` files go with the first message. When the model writes a video it is saved in
``--out-dir`` and its path printed. Lines piped on stdin are read as messages, e.g.
``printf 'What happens?\\nAnd then?\\n' | python scripts/chat.py --video clip.mp4``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Runnable from a source checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from divot.modeling import CheckpointError  # noqa: E402
from divot.video_io import VideoReadError  # noqa: E402
from llm.chat import GeneratedVideo  # noqa: E402
from llm.pipeline import PromptTooLongError, load  # noqa: E402

HELP = "commands: /video PATH (attach to the next message), /reset, /quit"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--video", action="append", default=[], help="video for the first message (repeatable)")
    parser.add_argument("--checkpoint", default=None, help="Divot-LLM checkpoint (default: newest under runs/)")
    parser.add_argument("--tokenizer", default=None, help="Divot tokenizer dir (default: the checkpoint's)")
    parser.add_argument("--detokenizer", default=None, help="de-tokenizer dir (default: the checkpoint's)")
    parser.add_argument("--device", default=None, help="e.g. cuda, cpu (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="LLM dtype, e.g. bfloat16")
    parser.add_argument("--seed", type=int, default=None, help="seed; message k uses seed + k")
    parser.add_argument("--sample", action="store_true", help="sample the text instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=25, help="de-tokenizer sampling steps for generated videos")
    parser.add_argument("--out-dir", type=Path, default=Path("chat_videos"), help="where generated videos go")
    parser.add_argument("--gif", action="store_true", help="write generated videos as GIF instead of mp4")
    return parser.parse_args(argv)


def read_line(interactive: bool) -> str | None:
    """The next input line, or None at end of input."""
    try:
        line = input("you> " if interactive else "")
    except EOFError:
        return None
    if not interactive:
        print(f"you> {line}")  # echo piped input so the transcript reads as a dialogue
    return line.strip()


def reply(pipe, args, message: str, videos: list[str], turn: int) -> None:
    print("divot> ", end="", flush=True)
    seed = None if args.seed is None else args.seed + turn
    out = pipe.chat(message, videos, seed=seed, do_sample=args.sample, temperature=args.temperature,
                    top_p=args.top_p, max_new_tokens=args.max_new_tokens, steps=args.steps,
                    stream=lambda piece: print(piece, end="", flush=True))
    print()
    if isinstance(out, GeneratedVideo):
        path = out.save(args.out_dir / f"video_{turn:03d}.{'gif' if args.gif else 'mp4'}")
        print(f"[video written to {path}]")


def chat_loop(pipe, args) -> None:
    interactive = sys.stdin.isatty()
    pending, turn = list(args.video), 0
    print(f"[Divot-LLM {pipe.checkpoint} on {pipe.device}]")
    if interactive:
        print(HELP)
    while (line := read_line(interactive)) is not None:
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            pipe.reset()
            print("[conversation cleared]")
        elif line.startswith("/video"):
            path = line[len("/video"):].strip()
            if path:
                pending.append(path)
                print(f"[{path} goes with your next message]")
            else:
                print("usage: /video PATH")
        elif line.startswith("/"):
            print(f"unknown command {line.split()[0]}; {HELP}")
        else:
            try:
                reply(pipe, args, line, pending, turn)
                turn += 1
            except (VideoReadError, PromptTooLongError, CheckpointError) as exc:
                print(f"\n[error: {exc}]")
            pending = []


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        pipe = load(args.checkpoint, tokenizer=args.tokenizer, detokenizer=args.detokenizer,
                    device=args.device, dtype=args.dtype)
        chat_loop(pipe, args)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print()
    print("bye")
    return 0


if __name__ == "__main__":
    sys.exit(main())
