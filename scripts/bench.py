"""Throughput, latency and peak memory of every Divot component, random weights, one device.

    python scripts/bench.py                                        # tiny preset on the CPU (about a minute)
    python scripts/bench.py --preset paper --device cuda --output bench_h100.json
    python scripts/bench.py --only llm_train,generation --batch-size 2 --seq-len 1024 --decode-steps 1,25,50

Sections (``--only`` picks some): ``tokenizer_encode`` (clips/s), ``detokenizer_train`` (seconds
per optimizer step: stage 1 trains tokenizer + de-tokenizer end to end, stage 2 the de-tokenizer
alone), ``detokenizer_decode`` (seconds per clip for each ``--decode-steps``, classifier-free
guidance on), ``llm_train`` (seconds per step, tokens/s, model FLOP/s utilisation),
``generation`` (text tokens/s with the KV cache; prompt-to-video seconds through
``DivotPipeline.generate_video``). Each reports the peak memory of the section:
``torch.cuda.max_memory_allocated`` on a GPU, ``ru_maxrss`` (the process peak so far) on the CPU.

Timing: ``--warmup`` untimed runs (they also compile, with ``--compile``), then the median of
``--iters`` timed ones; CUDA work is synchronised before each clock read. ``--optimizer-impl``
picks AdamW's kernels (training/optim.py). Models and inputs come from ``bench_models.py``:
random weights, nothing downloads; the LLM's weights are in ``--dtype``, as DeepSpeed bf16 holds
them; tokenizer, de-tokenizer and VAE keep float32 weights and run under autocast to that dtype
(accelerate's mixed precision). Optimizers are plain
``torch.optim.AdamW`` on one device (no DeepSpeed): step times are compute, not ZeRO
communication or CPU-offloaded optimizer steps. A section's peak memory includes the models
still resident from earlier sections (the autoencoder during ``llm_train`` and ``generation``).

LLM model FLOPs per step (attention scores and the projectors, < 2% at L = 512 for 7B, are
left out): with T = b·L tokens, N the parameters every token meets (all but the input
embedding, LM head and projectors), N_t the trainable ones among them (LoRA, RMSNorms), and
S supervised rows reaching the fully trained LM head (V·h parameters):

    FLOPs = 2·N·T (forward) + 2·N·T (activation gradients) + 2·N_t·T (weight gradients of trained
            parameters only, frozen ones get none) + 6·V·h·S (LM head, trained in full)

MFU = FLOPs / (step seconds × peak dense bf16 FLOP/s of the device, ``PEAK_BF16_FLOPS`` or
``--peak-flops``); "n/a" on the CPU.

Axes: b = batch, f = frames, c = channels, s = frame side, L = sequence length, n = tokens,
d = Divot token width.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_models import (MIN_SEQ_LEN, SUPERVISED_ROWS, amp, build_autoencoder, build_llm,  # noqa: E402,F401
                          clips, llm_batch)
from llm.model import DivotLLM  # noqa: E402
from llm.pipeline import DivotPipeline  # noqa: E402
from training import optim  # noqa: E402

SECTIONS = ("tokenizer_encode", "detokenizer_train", "detokenizer_decode", "llm_train", "generation")
# Dense bf16 tensor-core peaks (no sparsity), by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
DEFAULTS = {  # per preset: clips per encode / training batch, LLM batch and sequence length
    "tiny": {"encode_batch": 8, "train_batch": 2, "llm_batch": 2, "seq_len": 256},
    "paper": {"encode_batch": 8, "train_batch": 1, "llm_batch": 4, "seq_len": 512},
}
PROMPT = "a red circle moves to the left"


# --------------------------------------------------------------------------- measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds of ``iters`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@contextmanager
def peak_memory(device: torch.device, out: dict):
    """Sets ``out["peak_mem_gib"]``: the section's CUDA peak, or the process RSS peak so far."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    yield
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    else:  # Linux reports kilobytes; the process-wide maximum, not this section's
        out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def llm_step_flops(n_params: int, n_trainable: int, tokens: int, head_params: int = 0, head_rows: int = 0) -> float:
    """Model FLOPs of one LoRA training step (module docstring): (4·N + 2·N_t)·T + 6·V·h·S."""
    return (4 * n_params + 2 * n_trainable) * tokens + 6 * head_params * head_rows


def mfu(flops: float, seconds: float, peak_flops: float | None) -> float | None:
    """Model FLOP/s utilisation, None without a peak (the CPU)."""
    return None if not peak_flops else flops / seconds / peak_flops


def peak_flops_of(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


# --------------------------------------------------------------------------- sections


def bench_encode(ae, args, device, dtype) -> dict:
    video = clips(args.encode_batch, ae, device)
    with torch.no_grad(), amp(device, dtype):
        s = timed(lambda: ae.tokenizer(video), device, args.warmup, args.iters)
    return {"batch": args.encode_batch, "seconds_per_batch": s, "clips_per_s": args.encode_batch / s}


def bench_detok_train(ae, args, device, dtype) -> dict:
    ae.train()
    opt = optim.adamw([p for p in ae.parameters() if p.requires_grad], lr=1e-5, betas=(0.9, 0.99),
                      impl=args.optimizer_impl)
    video = clips(args.train_batch, ae, device)
    out = {"batch": args.train_batch}
    for stage in (1, 2):
        def step():
            with amp(device, dtype):
                loss, _ = ae(video, train_tokenizer=stage == 1, cond_dropout=0.0 if stage == 1 else 0.05)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        out[f"stage{stage}_step_s"] = timed(step, device, args.warmup, args.iters)
        out[f"stage{stage}_clips_per_s"] = args.train_batch / out[f"stage{stage}_step_s"]
    return out


def bench_decode(ae, args, device, dtype) -> dict:
    ae.eval()
    det = ae.detokenizer
    tokens = torch.randn(1, det.config.num_tokens, det.config.token_dim, device=device)
    out = {"guidance_scale": args.guidance_scale}
    with torch.no_grad(), amp(device, dtype):
        for _ in range(args.warmup):  # one short decode warms every kernel the long ones use
            det.decode(tokens, steps=1, guidance_scale=args.guidance_scale)
        for steps in args.decode_steps:
            out[f"steps_{steps}_s"] = timed(lambda: det.decode(tokens, steps=steps, guidance_scale=args.guidance_scale),
                                            device, 0, args.iters)
    return out


def llm_flop_counts(model: DivotLLM) -> tuple[int, int, int]:
    """(N, N_t, V·h) of the FLOPs formula: parameters every token meets, the trainable ones, LM head."""
    base = model.base_model
    skip = {id(p) for m in (base.get_input_embeddings(), base.get_output_embeddings(),
                            model.input_projector, model.output_projector) for p in m.parameters()}
    body = [p for p in model.parameters() if id(p) not in skip]
    return (sum(p.numel() for p in body), sum(p.numel() for p in body if p.requires_grad),
            base.get_output_embeddings().weight.numel())


def bench_llm_train(model: DivotLLM, args, device, peak) -> dict:
    model.train()
    opt = optim.adamw([p for p in model.parameters() if p.requires_grad], lr=1e-5, betas=(0.9, 0.99),
                      impl=args.optimizer_impl)
    batch = llm_batch(model, args.llm_batch, args.seq_len, device)

    def step():
        model(**batch, return_logits=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    s = timed(step, device, args.warmup, args.iters)
    n, n_t, head = llm_flop_counts(model)
    tokens = args.llm_batch * args.seq_len
    flops = llm_step_flops(n, n_t, tokens, head, args.llm_batch * SUPERVISED_ROWS)
    return {"batch": args.llm_batch, "seq_len": args.seq_len, "step_s": s, "tokens_per_s": tokens / s,
            "params": model.num_parameters(), "trainable_params": model.num_parameters(True), "flops_per_step": flops,
            "achieved_tflops": flops / s / 1e12, "mfu": mfu(flops, s, peak)}


def bench_generation(model: DivotLLM, ae, args, device) -> dict:
    pipe = DivotPipeline(model, ae.tokenizer, ae.detokenizer, device=device)
    prompt = torch.tensor([model.special_ids["bos"], *range(1000, 1031)])
    n = args.text_tokens

    def text():  # no stop ids: exactly n tokens whatever the random weights write
        assert len(model.generate_text(prompt, max_new_tokens=n, stop_ids=())) == n

    s = timed(text, device, args.warmup, args.iters)
    e2e = timed(lambda: pipe.generate_video(PROMPT, seed=0, steps=args.e2e_steps,
                                            guidance_scale=args.guidance_scale), device, args.warmup, args.iters)
    return {"text_tokens": n, "text_s": s, "text_tokens_per_s": n / s, "prompt_to_video_s": e2e,
            "prompt_to_video_steps": args.e2e_steps}


# --------------------------------------------------------------------------- command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(DEFAULTS), default="tiny")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="model weights and inputs (default: float32 on the CPU, bfloat16 on CUDA)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="clips per encode / training step and LLM sequences per step (default per preset)")
    p.add_argument("--seq-len", type=int, default=None, help="LLM training sequence length (default per preset)")
    p.add_argument("--decode-steps", default="1,25,50", help="comma-separated de-tokenizer step counts")
    p.add_argument("--e2e-steps", type=int, default=25, help="de-tokenizer steps of the prompt-to-video run")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--text-tokens", type=int, default=32, help="new tokens of the text-generation run")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in the LLM step")
    p.add_argument("--optimizer-impl", choices=optim.OPTIMIZER_IMPLS, default="foreach", help="AdamW kernels")
    p.add_argument("--compile", action="store_true", help="torch.compile the tokenizer, U-Net and LLM "
                   "(compilation happens in the --warmup runs, which must then be >= 1)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    p.add_argument("--iters", type=int, default=3, help="timed runs (the median is reported)")
    p.add_argument("--peak-flops", type=float, default=None, help="peak dense FLOP/s for MFU (overrides the table)")
    p.add_argument("--output", help="write the results as JSON to this file")
    p.add_argument("--force", action="store_true", help="run the paper preset on the CPU anyway")
    args = p.parse_args(argv)
    return check_args(p, args)


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(args.only) - set(SECTIONS))
    if unknown or not args.only:
        p.error(f"--only: unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    try:
        args.decode_steps = [int(x) for x in args.decode_steps.split(",") if x.strip()]
    except ValueError:
        p.error(f"--decode-steps takes comma-separated integers, got {args.decode_steps!r}")
    if not args.decode_steps or min(args.decode_steps) < 1 or args.iters < 1 or args.warmup < int(args.compile):
        p.error("--decode-steps must be >= 1, --iters >= 1 and --warmup >= 0 (>= 1 with --compile)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.preset == "paper" and args.device == "cpu" and not args.force:
        p.error("--preset paper on the CPU builds ~10B parameters (over 40 GB in float32) and takes hours per "
                "step; use --device cuda, or --force to run it anyway")
    d = DEFAULTS[args.preset]
    b = args.batch_size
    if b is not None and b < 1:
        p.error("--batch-size must be >= 1")
    args.encode_batch, args.train_batch, args.llm_batch = (b, b, b) if b else (
        d["encode_batch"], d["train_batch"], d["llm_batch"])
    args.seq_len = args.seq_len or d["seq_len"]
    if args.seq_len < MIN_SEQ_LEN:
        p.error(f"--seq-len {args.seq_len} is too short: <s>, a clip, {SUPERVISED_ROWS} labelled rows and a "
                f"query block need {MIN_SEQ_LEN}")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    return args


def run(args: argparse.Namespace) -> dict:
    """Every requested section; returns the JSON-ready results."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    peak = peak_flops_of(device, args.peak_flops)
    torch.manual_seed(0)
    results = {"preset": args.preset, "device": args.device, "dtype": args.dtype, "torch": torch.__version__,
               "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
               or platform.machine(), "threads": torch.get_num_threads(), "peak_flops": peak,
               "warmup": args.warmup, "iters": args.iters, "optimizer_impl": args.optimizer_impl,
               "compile": args.compile, "sections": {}, "section_wall_s": {}}
    ae = llm = None
    for name in SECTIONS:
        if name not in args.only:
            continue
        start, out = time.perf_counter(), {}
        with peak_memory(device, out):
            if ae is None and name != "llm_train":
                ae = build_autoencoder(args.preset, device)
                optim.compile_modules(ae.tokenizer, ae.detokenizer.unet, enabled=args.compile)
            if llm is None and name in ("llm_train", "generation"):
                llm = build_llm(args.preset, device, dtype, args.grad_ckpt)
                optim.compile_modules(llm.lm, enabled=args.compile)
            out.update(run_section(name, ae, llm, args, device, dtype, peak))
        results["sections"][name] = out
        results["section_wall_s"][name] = time.perf_counter() - start
        print(f"{name}: {format_section(out)}  [{results['section_wall_s'][name]:.1f} s]", flush=True)
    return results


def run_section(name, ae, llm, args, device, dtype, peak) -> dict:
    if name == "tokenizer_encode":
        return bench_encode(ae, args, device, dtype)
    if name == "detokenizer_train":
        return bench_detok_train(ae, args, device, dtype)
    if name == "detokenizer_decode":
        return bench_decode(ae, args, device, dtype)
    if name == "llm_train":
        return bench_llm_train(llm, args, device, peak)
    with amp(device, dtype):
        return bench_generation(llm, ae, args, device)


def format_section(out: dict) -> str:
    def fmt(v):
        if v is None:
            return "n/a"
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    return ", ".join(f"{k}={fmt(v)}" for k, v in out.items())


def main(argv=None) -> dict:
    args = parse_args(argv)
    print(f"bench: preset {args.preset}, {args.device} ({args.dtype}), sections {', '.join(args.only)}", flush=True)
    results = run(args)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    main()
