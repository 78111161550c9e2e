"""Drawing the next text token from the LM head's logits: greedy, or temperature + top-p.

Axes: v = vocabulary (``logits`` is one position's (v,) row).
"""
from __future__ import annotations

import torch


def next_token(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float,
                generator: torch.Generator | None) -> int:
    """Greedy, or a draw from softmax(logits / T) restricted to the top-p nucleus."""
    if not do_sample:
        return int(logits.argmax())
    if temperature <= 0 or not 0 < top_p <= 1:
        raise ValueError(f"sampling needs temperature > 0 and 0 < top_p ≤ 1, got {temperature}, {top_p}")
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        sorted_probs[(sorted_probs.cumsum(-1) - sorted_probs) >= top_p] = 0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    if generator is not None:
        probs = probs.to(generator.device)
    return int(torch.multinomial(probs, 1, generator=generator))
