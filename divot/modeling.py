"""``save_pretrained`` / ``from_pretrained`` for every Divot component.

A component is an ``nn.Module`` with a frozen dataclass ``config`` and a
``config_class`` attribute. On disk it is a directory holding ``config.json``
(with a ``_class`` tag naming the component) beside ``model.safetensors``.
Files are written to a temporary name first and renamed, so a crash never
leaves a half-written checkpoint.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import ClassVar, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from divot import config as cfglib

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, incomplete or does not fit the model."""


def atomic_save_state_dict(state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # safetensors refuses shared storage; clone makes each tensor its own buffer.
    save_file({k: v.detach().contiguous().clone().cpu() for k, v in state.items()}, str(tmp))
    os.replace(tmp, path)


def check_state_dict(own: Mapping[str, torch.Size], state: Mapping[str, torch.Tensor], source: str,
                     what: str) -> None:
    """Raise CheckpointError listing missing/unexpected keys and shape mismatches of ``state``
    against the expected ``own`` (name → shape) of ``what``."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k])}"
                  for k in sorted(set(own) & set(state)) if tuple(own[k]) != tuple(state[k].shape)]
    if missing or unexpected or mismatched:
        lines = [f"checkpoint {source} does not fit {what}:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                shown = ", ".join(items[:10]) + (f" … (+{len(items) - 10})" if len(items) > 10 else "")
                lines.append(f"  {title} ({len(items)}): {shown}")
        raise CheckpointError("\n".join(lines))


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load with a readable report of missing/unexpected keys and shape mismatches. A model with
    an ``upgrade_state_dict(state)`` method first rewrites weights saved by its earlier layouts."""
    upgrade = getattr(model, "upgrade_state_dict", None)
    if upgrade is not None:
        state = upgrade(state)
    check_state_dict({k: v.shape for k, v in model.state_dict().items()}, state, source, type(model).__name__)
    model.load_state_dict(state, strict=True)


class PretrainedMixin:
    """Adds directory-based save/load to an ``nn.Module`` holding ``self.config``."""

    config_class: ClassVar[type]

    def save_pretrained(self, directory: str | os.PathLike, state_dict: dict | None = None) -> None:
        """Write ``config.json`` + ``model.safetensors``; ``state_dict`` overrides the module's
        own (e.g. the full weights gathered under ZeRO-3)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_save_state_dict(self.state_dict() if state_dict is None else state_dict, directory / WEIGHTS_NAME)
        cfglib.save_json(self.config, directory, extra={"_class": type(self).__name__})
        logger.info("saved %s to %s", type(self).__name__, directory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str = "cpu", **overrides):
        directory = Path(directory)
        if not (directory / cfglib.CONFIG_NAME).is_file():
            raise CheckpointError(f"{directory}: no {cfglib.CONFIG_NAME}; is this a {cls.__name__} directory?")
        if not (directory / WEIGHTS_NAME).is_file():
            raise CheckpointError(f"{directory}: no {WEIGHTS_NAME}")
        cfg = cfglib.load_json(cls.config_class, directory, drop=("_class",))
        if overrides:
            cfg = cfglib.replace(cfg, **overrides)
        model = cls(cfg)
        state = load_file(str(directory / WEIGHTS_NAME), device=map_location)
        load_state_dict_strict(model, state, str(directory))
        return model

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
