"""Command line → resolved frozen config: YAML file, then typed ``key=value`` overrides.

Every training script accepts ``--config FILE`` (YAML), ``--output-dir``,
``--max-steps``, ``--resume`` and any number of dotted overrides, written either
``stage1.lr=3e-4`` or ``--stage1.lr=3e-4``. Overrides are checked against the
dataclass: an unknown key or a value of the wrong type stops the run before
anything is built (house rule: unknown config keys raise).
"""
from __future__ import annotations

import argparse
from typing import Any, Callable, Sequence, TypeVar

from divot import config as cfglib

T = TypeVar("T")


def build_parser(description: str, default_output: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=description,
        epilog="Any other argument KEY=VALUE (or --KEY=VALUE) overrides a config field, "
               "e.g. stage1.lr=3e-4 data.num_workers=2.")
    p.add_argument("--config", help="YAML config file (merged over the preset defaults)")
    p.add_argument("--output-dir", default=None, help=f"run directory (default {default_output})")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps in all")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate ``key=value`` overrides from regular flags (``--flag value`` stays a flag)."""
    flags, overrides = [], []
    for arg in argv:
        body = arg[2:] if arg.startswith("--") else arg
        name = body.split("=", 1)[0]
        if "=" in body and ("." in name or not arg.startswith("--") or "_" in name):
            overrides.append(body)
        else:
            flags.append(arg)
    return flags, overrides


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None):
    import sys
    argv = list(sys.argv[1:] if argv is None else argv)
    flags, overrides = split_overrides(argv)
    args = parser.parse_args(flags)
    return args, cfglib.parse_overrides(overrides)


def resolve(cls: type[T], args, overrides: dict[str, Any],
            expand: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> T:
    """defaults ← YAML ← CLI overrides ← dedicated flags, then ``expand`` (e.g. presets) → dataclass."""
    data: dict[str, Any] = {}
    if args.config:
        data = cfglib.load_yaml(args.config)
    data = cfglib.merge(data, overrides)
    if getattr(args, "output_dir", None):
        data["output_dir"] = args.output_dir
    if getattr(args, "max_steps", None) is not None:
        data["max_steps"] = args.max_steps
    if expand is not None:
        data = expand(data)
    return cfglib.from_dict(cls, data)
