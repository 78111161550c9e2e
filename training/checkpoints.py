"""Crash-safe training checkpoints: atomic writes, ``step_*`` directories, resume.

Every rank calls :meth:`CheckpointManager.save` / :meth:`CheckpointManager.load` (they
are collective under DeepSpeed). Loading also re-links LR schedulers to the optimizer that
really steps (:func:`relink_schedulers`), which ZeRO optimizer offload otherwise breaks.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
LATEST_FILE = "latest"
_STEP_RE = re.compile(r"^step_(\d+)$")


def atomic_write_text(path: Path, text: str) -> None:
    # write-then-rename: a reader sees the old file or the new one, never half of one
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:  # makes the renames durable; some filesystems refuse, the renames stay atomic
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


class CheckpointManager:
    """Crash-safe training checkpoints under ``output_dir/checkpoints/step_00000123/``.

    A checkpoint is ``accelerator.save_state`` (models, optimizers, schedulers, RNG states
    of every process, DeepSpeed shards) plus ``trainer_state.json`` (``extra``). It is
    written into ``step_X.tmp`` and renamed into place only when complete, then the
    ``latest`` pointer file is replaced atomically. A killed run leaves at worst a
    ``.tmp`` directory, which is never loaded. Multi-node runs need ``output_dir`` on a
    filesystem shared by all nodes (every rank writes its own DeepSpeed shard).
    """

    def __init__(self, output_dir: str | os.PathLike, keep_last: int | None = 2):
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last

    def step_dir(self, step: int) -> Path:
        return self.root / f"step_{int(step):08d}"

    def save(self, accelerator: Accelerator, step: int, extra: dict | None = None) -> Path:
        """Save on all ranks (collective); returns the final checkpoint directory."""
        final = self.step_dir(step)
        tmp = final.with_name(final.name + ".tmp")
        if accelerator.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()  # no rank writes into a tmp dir being cleared
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()  # every shard is on disk before the rename
        if accelerator.is_main_process:
            state = {"step": int(step), **(extra or {})}
            atomic_write_text(tmp / STATE_FILE, json.dumps(state, indent=2, default=str))
            self._publish(tmp, final)
            atomic_write_text(self.root / LATEST_FILE, final.name + "\n")
            _fsync_dir(self.root)
            self._prune(keep=final)
            logger.info("saved checkpoint %s", final)
        accelerator.wait_for_everyone()  # nobody goes on (or reads `latest`) before it is published
        return final

    def _publish(self, tmp: Path, final: Path) -> None:
        old = final.with_name(final.name + ".old")
        if final.exists():  # the same step saved twice (e.g. right after a resume)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for d in self.root.iterdir():
            m = _STEP_RE.match(d.name)
            if m and d.is_dir() and (d / STATE_FILE).is_file():
                found.append((int(m.group(1)), d))
        return [d for _, d in sorted(found)]

    def _prune(self, keep: Path) -> None:
        if not self.keep_last or self.keep_last <= 0:
            return
        for d in self.checkpoints()[: -self.keep_last]:
            if d != keep:
                shutil.rmtree(d, ignore_errors=True)

    def remove_stale(self) -> None:
        """Delete ``.tmp``/``.old`` leftovers of a killed run. Only while no save runs."""
        if not self.root.is_dir():
            return
        for d in self.root.iterdir():
            if d.is_dir() and d.name.startswith("step_") and d.suffix in (".tmp", ".old"):
                logger.warning("removing incomplete checkpoint %s", d)
                shutil.rmtree(d, ignore_errors=True)

    def latest(self, accelerator: Accelerator | None = None) -> Path | None:
        """Newest complete checkpoint or None; call while no save runs. Deletes stale
        ``.tmp`` dirs (with an accelerator: from its main process only)."""
        if accelerator is None or accelerator.is_main_process:
            self.remove_stale()
        pointer = self.root / LATEST_FILE
        if pointer.is_file():
            named = self.root / pointer.read_text().strip()
            if _STEP_RE.match(named.name) and (named / STATE_FILE).is_file():
                return named
        complete = self.checkpoints()
        return complete[-1] if complete else None

    def load(self, accelerator: Accelerator, path: str | os.PathLike, check=None) -> dict:
        """Restore everything ``save`` wrote (collective); returns its ``extra`` dict. ``check(path)``,
        if given, runs first: it raises for a checkpoint this code cannot resume (with the reason)."""
        path = Path(path)
        state_file = path / STATE_FILE
        if not state_file.is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
        if check is not None:
            check(path)
        accelerator.load_state(str(path))
        relink_schedulers(accelerator)
        logger.info("resumed from %s", path)
        return json.loads(state_file.read_text())

    def load_latest(self, accelerator: Accelerator, check=None) -> dict | None:
        """``load(latest(), check)`` or None when there is nothing to resume from."""
        path = self.latest(accelerator)
        accelerator.wait_for_everyone()  # stale-dir cleanup done before anyone reads
        return None if path is None else self.load(accelerator, path, check)

    def resume(self, accelerator: Accelerator, resume: bool, check=None) -> tuple[dict | None, int]:
        """(trainer state, step to go on from): the latest checkpoint with ``--resume``, else a fresh start."""
        state = self.load_latest(accelerator, check) if resume else None
        if resume and state is None:
            logger.warning("--resume given but %s holds no checkpoint; starting from scratch", self.root)
        return state, int(state["step"]) if state else 0


def stepping_optimizer(opt):
    """The innermost torch Optimizer under accelerate/DeepSpeed wrappers (the one that steps)."""
    found = opt if isinstance(opt, torch.optim.Optimizer) else None
    while hasattr(opt, "optimizer") and opt.optimizer is not opt:
        opt = opt.optimizer
        if isinstance(opt, torch.optim.Optimizer):
            found = opt
    return found


def relink_schedulers(accelerator: Accelerator) -> int:
    """Point prepared LR schedulers at the optimizer that really steps; returns how many moved.

    With ZeRO optimizer offload accelerate swaps the torch optimizer for DeepSpeed's CPU
    Adam, sharing its param-group dicts -- until ``load_state_dict`` installs new ones:
    then the scheduler writes LRs into the orphaned torch optimizer and training silently
    keeps the LR of the save step. Called by ``CheckpointManager.load``.
    """
    moved = 0
    for sched in getattr(accelerator, "_schedulers", []):  # accelerate keeps no public list
        inner = getattr(sched, "scheduler", None)
        opts = getattr(sched, "optimizers", None) or []
        if inner is None or len(opts) != 1:
            continue
        target = stepping_optimizer(opts[0])
        if target is not None and inner.optimizer is not target:
            inner.optimizer = target
            moved += 1
    return moved
