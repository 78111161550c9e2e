"""Exponential moving average of the weights for the tokenizer run.

Diffusion models are sampled from an average of their recent weights (DDPM, LDM): the last
weights of a short run at a high learning rate and a small batch carry the noise of their last
few steps, which every sample inherits. On the ``tiny`` default run the average lifts the
reconstructions' PSNR by 0.6 dB (docs/TOKENIZER_TRAINING.md, finding 16).

The decay at optimizer step k is ``min(decay, (1 + k) / (10 + k))``, the warm-up diffusers'
``EMAModel`` uses by default, so the fast-moving early weights are forgotten quickly; a
900-step run ends near 0.99 whatever ``decay`` is above that.

The tokenizer and the de-tokenizer are averaged separately. Stage 2 holds the tokenizer fixed
and teaches the de-tokenizer to read *its* tokens, so at the start of stage 2 the tokenizer's
average is reset to the live tokenizer (:meth:`TokenizerEMA.reset_tokenizer`): the exported
tokenizer is then exactly the one stage 2 trained on. (Loading the average into the live
tokenizer instead would not survive DeepSpeed, whose optimizer writes its own fp32 master copy
back into the parameters after every step.)
The averages are float32 whatever the weights' dtype (a bf16 average at decay 0.99 would not
move: each step's change is below bf16's resolution). Under DeepSpeed ZeRO-3 each rank averages
its own shard of every parameter (``param.ds_tensor``); the export gathers the shards as usual.
"""
from __future__ import annotations

import contextlib
import logging

import torch

logger = logging.getLogger(__name__)

PARTS = ("tokenizer", "detokenizer")


def check_decay(decay: float) -> None:
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1) (0 = off), got {decay}")


def decay_at(decay: float, step: int) -> float:
    """The decay used by the ``step``-th update (1-based): warm-up, then ``decay``."""
    return min(decay, (1.0 + step) / (10.0 + step))


def _local(module: torch.nn.Module) -> list[torch.Tensor]:
    """The values this rank holds of each parameter: the whole tensor, or its ZeRO-3 shard."""
    return [getattr(p, "ds_tensor", p).data for p in module.parameters()]


class TokenizerEMA:
    """Averages of ``model.tokenizer`` and ``model.detokenizer`` (a ``TokenizerAutoencoder``).
    Register it with ``accelerator.register_for_checkpointing`` so that ``--resume`` restores it."""

    def __init__(self, model: torch.nn.Module, decay: float):
        check_decay(decay)
        self.model, self.decay, self.num_updates = model, float(decay), 0
        self.shadow = {name: [t.detach().float().clone() for t in _local(getattr(model, name))] for name in PARTS}
        shards = sum(hasattr(p, "ds_tensor") for p in model.parameters())
        logger.info("moving average of the weights, decay %g (%d tensors%s)", decay, sum(map(len, self.shadow.values())),
                    f", {shards} of them this rank's ZeRO-3 shards" if shards else "")

    @torch.no_grad()
    def step(self) -> None:
        self.num_updates += 1
        weight = 1.0 - decay_at(self.decay, self.num_updates)
        for name in PARTS:
            for s, w in zip(self.shadow[name], _local(getattr(self.model, name))):
                s.lerp_(w.float(), weight)  # s ← s + (1 − decay)(w − s)

    @torch.no_grad()
    def _load(self, name: str, values: list[torch.Tensor]) -> None:
        for t, v in zip(_local(getattr(self.model, name)), values):
            t.copy_(v)

    @torch.no_grad()
    def reset_tokenizer(self) -> None:
        """The tokenizer's average becomes the live tokenizer (the stage-2 start, where it freezes)."""
        self.shadow["tokenizer"] = [t.detach().float().clone() for t in _local(self.model.tokenizer)]
        logger.info("tokenizer frozen for stage 2: its exported weights are the live ones, not an average")

    def copy_to_model(self) -> None:
        """Load both averages into the live model (for export, at the end of a run)."""
        for name in PARTS:
            self._load(name, self.shadow[name])

    @contextlib.contextmanager
    def averaged(self):
        """The live model holds the averages inside the block and its own weights after it."""
        saved = {name: [t.clone() for t in _local(getattr(self.model, name))] for name in PARTS}
        self.copy_to_model()
        try:
            yield
        finally:
            for name in PARTS:
                self._load(name, saved[name])

    # accelerate's register_for_checkpointing protocol
    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        shadow = state.get("shadow", {})
        if set(shadow) != set(PARTS):
            raise ValueError(f"EMA state holds {sorted(shadow)}, expected {sorted(PARTS)}")
        for name in PARTS:
            mine, theirs = self.shadow[name], shadow[name]
            if [t.shape for t in mine] != [t.shape for t in theirs]:
                raise ValueError(f"EMA state of the {name} does not match this model's parameters")
        self.decay, self.num_updates = float(state["decay"]), int(state["num_updates"])
        self.shadow = {name: [t.float().clone() for t in shadow[name]] for name in PARTS}
