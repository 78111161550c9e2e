"""Random-weight models and inputs for the benchmarks (``bench.py``, ``profile_llm_step.py``).

``paper``: the published shapes, Mistral-7B-v0.1 from a ``MistralConfig`` built on the device
in the benchmark dtype, an SD-1.x sized ``AutoencoderKL``; nothing downloads. The LLM holds
every weight in that dtype, as DeepSpeed bf16 does; tokenizer, de-tokenizer and VAE keep
float32 weights and run under :func:`amp` (accelerate's mixed precision).

Axes: b = batch, f = frames, s = frame side, L = sequence length, n = tokens, d = token width.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from divot.detokenizer import DivotDetokenizer  # noqa: E402
from divot.presets import detokenizer_config, tokenizer_config  # noqa: E402
from divot.tokenizer import DivotTokenizer  # noqa: E402
from llm.llm_config import llm_config  # noqa: E402
from llm.model import DivotLLM  # noqa: E402
from llm.text_tokenizer import IGNORE_INDEX, MISTRAL_V1_VOCAB_SIZE, NUM_QUERY_TOKENS  # noqa: E402
from memory_plan import SD_VAE  # noqa: E402
from training.tokenizer_setup import TokenizerAutoencoder  # noqa: E402

SUPERVISED_ROWS = 32  # text rows per sequence with a label (an answer / caption)
MIN_SEQ_LEN = 2 * NUM_QUERY_TOKENS + SUPERVISED_ROWS + 2


@contextmanager
def building(device: torch.device, dtype: torch.dtype):
    """Parameters created directly on ``device`` in ``dtype``: a 7B model is never built in fp32
    on the host first."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(before)


def build_autoencoder(preset: str, device: torch.device) -> TokenizerAutoencoder:
    """Random tokenizer + de-tokenizer in float32 (run under :func:`amp`); latent space gets a
    random SD-sized VAE."""
    with torch.device(device):
        det = DivotDetokenizer(detokenizer_config(preset))
        if det.config.space == "latent":
            from diffusers import AutoencoderKL
            det.vae = AutoencoderKL(**SD_VAE).requires_grad_(False).eval()
        return TokenizerAutoencoder(DivotTokenizer(tokenizer_config(preset)), det)


def build_llm(preset: str, device: torch.device, dtype: torch.dtype, grad_ckpt: bool) -> DivotLLM:
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    with building(device, dtype):
        model = DivotLLM(llm_config(preset, dtype=name, gradient_checkpointing=grad_ckpt))
    # peft keeps LoRA adapters in float32 beside a bf16 base; DeepSpeed bf16 casts the whole
    # module, so the measured step holds every weight in ``dtype``, as training does.
    return model.to(dtype)


def amp(device: torch.device, dtype: torch.dtype):
    """bf16/fp16 autocast around the float32 autoencoder (accelerate's mixed precision): the
    latent de-tokenizer's VAE path returns float32 latents, which bf16 weights would refuse."""
    return nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def clips(b: int, ae: TokenizerAutoencoder, device: torch.device) -> torch.Tensor:
    cfg = ae.detokenizer.config
    return torch.rand(b, cfg.num_frames, 3, cfg.frame_size, cfg.frame_size, device=device) * 2 - 1


def llm_batch(model: DivotLLM, b: int, seq_len: int, device: torch.device) -> dict:
    """One clip (64 placeholders) after ``<s>``, text, SUPERVISED_ROWS labelled rows and a query block
    at the end: the data contract of ``DivotLLM.forward`` with both loss terms present."""
    n, d = model.config.num_query_tokens, model.config.token_dim
    if seq_len < 2 * n + SUPERVISED_ROWS + 2:
        raise ValueError(f"seq_len {seq_len} is too short: a clip and a query block need "
                         f"{2 * n + SUPERVISED_ROWS + 2}")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, MISTRAL_V1_VOCAB_SIZE, (b, seq_len), generator=g)
    ids[:, 0] = model.special_ids["bos"]
    clip = torch.zeros(b, seq_len, dtype=torch.bool)
    clip[:, 1:1 + n] = True
    query = torch.zeros(b, seq_len, dtype=torch.bool)
    query[:, -n:] = True
    ids[query] = torch.tensor(model.special_ids["query"]).repeat(b)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -n - SUPERVISED_ROWS:-n] = ids[:, -n - SUPERVISED_ROWS:-n]
    batch = {"input_ids": ids, "labels": labels, "clip_mask": clip, "query_mask": query,
             "clip_tokens": torch.randn(b, n, d, generator=g), "target_tokens": torch.randn(b, n, d, generator=g)}
    return {k: v.to(device) for k, v in batch.items()}
