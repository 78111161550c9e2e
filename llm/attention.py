"""Attention mask for generation: bidirectional inside each query block, causal elsewhere.

DESIGN.md §4: the 64 generation query tokens "attend to each other bidirectionally (the rest
stays causal)"; the paper's ablation finds this beats causal queries. Position i may attend
to position j when

    (j ≤ i  or  i, j lie in the same query block)  and  j is not padding
    [and  i − j < sliding_window, when the model uses one]

and every position may always attend to itself, so no row is empty (a fully masked row gives
NaN in SDPA; padded rows are garbage either way and carry no loss).

How the mask reaches the model (transformers 5.23): ``MistralModel.forward`` hands
``attention_mask`` to ``masking_utils.create_causal_mask`` (or its sliding-window twin), whose
``_preprocess_mask_arguments`` returns any 4-D tensor unchanged ("already prepared, or
custom"). So the mask must be complete: shape (b, 1, q, kv) with padding and causality
folded in; Mistral's ``sliding_window`` is *not* applied to it, hence the optional argument.
The attention kernels then differ in what they accept:

* ``eager`` adds the mask to the scores: it needs an additive float mask (0 keep, dtype-min
  drop) in the model's dtype; a bool mask would be added as 0/1 and silently do nothing.
* ``sdpa`` passes it as ``attn_mask``: bool (True = attend) or a float mask of the query dtype.

The default, a float mask in the model dtype, therefore works for both. For a forward over
the last ``q`` positions with a KV cache, slice the full mask: ``mask[:, :, -q:, :]``.

Axes: b = batch, i = query position, j = key position (L = sequence length).
"""
from __future__ import annotations

import torch
from einops import rearrange


def query_block_index(query_mask: torch.Tensor) -> torch.Tensor:
    """(b, L) bool → (b, L) long: 0 outside query blocks, 1, 2, … for each contiguous run."""
    q = query_mask.bool()
    prev = torch.nn.functional.pad(q[:, :-1], (1, 0), value=False)
    starts = q & ~prev
    return torch.cumsum(starts.long(), dim=1) * q.long()


def allowed_attention(query_mask: torch.Tensor, padding_mask: torch.Tensor | None = None,
                      sliding_window: int | None = None) -> torch.Tensor:
    """(b, L) query mask [+ (b, L) padding mask, 1/True = real token] → (b, L, L) bool."""
    b, length = query_mask.shape
    pos = torch.arange(length, device=query_mask.device)
    causal = rearrange(pos, "j -> 1 j") <= rearrange(pos, "i -> i 1")
    block = query_block_index(query_mask)
    same_block = (rearrange(block, "b i -> b i 1") == rearrange(block, "b j -> b 1 j")) \
        & rearrange(block > 0, "b i -> b i 1")
    allowed = causal.unsqueeze(0) | same_block
    if sliding_window is not None:
        within = rearrange(pos, "i -> i 1") - rearrange(pos, "j -> 1 j") < sliding_window
        allowed = allowed & within.unsqueeze(0)
    if padding_mask is not None:
        allowed = allowed & rearrange(padding_mask.bool(), "b j -> b 1 j")
    return allowed | torch.eye(length, dtype=torch.bool, device=query_mask.device).unsqueeze(0)


def query_block_mask(query_positions_mask: torch.Tensor, padding_mask: torch.Tensor | None = None,
                     dtype: torch.dtype = torch.float32, sliding_window: int | None = None) -> torch.Tensor:
    """The 4-D mask to pass as ``attention_mask`` to ``MistralForCausalLM`` (b, 1, L, L).

    ``dtype`` bool gives True = attend (SDPA only); a float dtype (the model's) gives the
    additive 0 / ``finfo(dtype).min`` mask that both ``eager`` and ``sdpa`` accept.
    With no query positions this is exactly the causal (+ padding) mask.
    """
    if query_positions_mask.ndim != 2:
        raise ValueError(f"query_positions_mask must be (b, L), got {tuple(query_positions_mask.shape)}")
    if padding_mask is not None and padding_mask.shape != query_positions_mask.shape:
        raise ValueError(f"padding_mask {tuple(padding_mask.shape)} != query mask {tuple(query_positions_mask.shape)}")
    allowed = rearrange(allowed_attention(query_positions_mask, padding_mask, sliding_window), "b i j -> b 1 i j")
    if dtype == torch.bool:
        return allowed
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be torch.bool or a float dtype, got {dtype}")
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)
