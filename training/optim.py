"""Optimizer and compilation options shared by the training scripts.

``optimizer_impl`` picks how torch's AdamW walks the parameters. All three compute the same
update (tests/test_optim.py); they differ in kernel launches and Python overhead:

- ``"foreach"`` (default): multi-tensor kernels, a few launches per step for all parameters;
- ``"fused"``: one fused kernel per device and dtype (CUDA; CPU in recent torch releases);
- ``"loop"``: one parameter at a time, torch's reference implementation.

Under DeepSpeed the engine wraps this optimizer, unless the DeepSpeed config names its own.

``compile`` runs ``nn.Module.compile()`` in place on a script's hot modules (the U-Net,
the tokenizer, the LLM), so parameter names, checkpoints and resumption are unchanged; the
first steps pay for compilation, and shapes that change (the last, shorter batch) compile
again. It is off by default: on two CPU cores compilation costs more than a short run saves
(docs/RESULTS.md, "Optimizer kernels and torch.compile").
"""
from __future__ import annotations

import logging
from typing import Iterable, Literal, get_args

import torch
from torch import nn

logger = logging.getLogger(__name__)

OptimizerImpl = Literal["foreach", "fused", "loop"]  # the config field type of every training script
OPTIMIZER_IMPLS = get_args(OptimizerImpl)
_FLAGS = {"foreach": {"foreach": True}, "fused": {"fused": True}, "loop": {"foreach": False}}


def adamw(params: Iterable, *, lr: float, betas: tuple[float, float], weight_decay: float = 0.01,
          eps: float = 1e-8, impl: str = "foreach") -> torch.optim.AdamW:
    """``torch.optim.AdamW`` with the kernel choice ``impl`` (one of ``OPTIMIZER_IMPLS``).

    ``params`` may be parameter groups; a group's own ``weight_decay`` wins over the default.
    """
    if impl not in _FLAGS:
        raise ValueError(f"optimizer_impl must be one of {OPTIMIZER_IMPLS}, got {impl!r}")
    try:
        return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                 **_FLAGS[impl])
    except (RuntimeError, ValueError) as err:
        raise RuntimeError(f"optimizer_impl={impl!r} is not available for these parameters "
                           f"({err}); use 'foreach'") from err


def compile_modules(*modules: nn.Module | None, enabled: bool = True) -> list[str]:
    """Compile each module in place (``None`` entries are skipped); returns their class names."""
    if not enabled:
        return []
    names = []
    for module in modules:
        if module is not None:
            module.compile()
            names.append(type(module).__name__)
    logger.info("torch.compile on %s (compiled on first use)", ", ".join(names))
    return names
