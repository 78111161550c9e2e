"""Where one Divot-LLM LoRA training step spends its time: torch.profiler over a few steps.

    python scripts/profile_llm_step.py                                    # tiny preset on the CPU
    python scripts/profile_llm_step.py --preset paper --device cuda       # Mistral-7B sizes, bf16
    python scripts/profile_llm_step.py --preset paper --device cuda --trace step.json   # + Chrome trace

The model, batch and optimizer are built as ``scripts/bench.py``'s ``llm_train`` section builds
them (``scripts/bench_models.py``: random weights, every weight in ``--dtype`` as DeepSpeed bf16
holds them). After
``--warmup`` untimed steps, ``--steps`` steps run under the profiler. Printed: the operators
with the most time (device time on a GPU, CPU time on the CPU), then the share of that time
in matrix products and attention (:data:`MATMUL_OPS`), the part MFU measures. The last line
is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402  (puts the repository on sys.path)
from bench_models import build_llm, llm_batch  # noqa: E402
from training import optim  # noqa: E402

# Operators whose kernels are matrix products or fused attention (their own time only).
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product_efficient_attention",
              "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_cudnn_attention",
              "aten::_efficient_attention_backward", "aten::_flash_attention_backward",
              "aten::_cudnn_attention_backward", "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def op_times(prof, on_device: bool) -> dict[str, float]:
    """Seconds of each operator's own work (its kernels on a GPU; itself on the CPU)."""
    times = {}
    for evt in prof.key_averages():
        if evt.device_type != torch.autograd.DeviceType.CPU:  # kernel rows repeat their operator's time
            continue
        us = evt.self_device_time_total if on_device else evt.self_cpu_time_total
        if us > 0:
            times[evt.key] = us / 1e6
    return times


def matmul_share(times: dict[str, float]) -> float:
    total = sum(times.values())
    return sum(v for k, v in times.items() if k in MATMUL_OPS) / total if total else 0.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(bench.DEFAULTS), default="tiny")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="default: float32 on the CPU, bfloat16 on CUDA")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default per preset)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default per preset)")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--steps", type=int, default=2, help="profiled steps")
    p.add_argument("--top", type=int, default=20, help="operators to list")
    p.add_argument("--trace", help="also write a Chrome trace (chrome://tracing, Perfetto) to this file")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.preset == "paper" and args.device == "cpu":
        p.error("--preset paper builds a 7B model: use --device cuda")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    d = bench.DEFAULTS[args.preset]
    args.batch_size, args.seq_len = args.batch_size or d["llm_batch"], args.seq_len or d["seq_len"]
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = build_llm(args.preset, device, dtype, args.grad_ckpt).train()
    opt = optim.adamw([p for p in model.parameters() if p.requires_grad], lr=1e-5, betas=(0.9, 0.99))
    batch = llm_batch(model, args.batch_size, args.seq_len, device)

    def step():
        model(**batch, return_logits=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    bench.sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        bench.sync(device)
    on_device = device.type == "cuda"
    times = op_times(prof, on_device)
    print(f"{'operator':<60} {'s/step':>9} {'share':>7}")
    total = sum(times.values())
    for name, sec in sorted(times.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"{name[:60]:<60} {sec / args.steps:>9.4f} {sec / total:>7.1%}")
    if args.trace:
        prof.export_chrome_trace(args.trace)
        print(f"wrote {args.trace}")
    result = {"preset": args.preset, "device": args.device, "dtype": args.dtype, "batch": args.batch_size,
              "seq_len": args.seq_len, "grad_ckpt": args.grad_ckpt, "clock": "device" if on_device else "cpu",
              "seconds_per_step": total / args.steps, "matmul_share": matmul_share(times)}
    print(f"{'device' if on_device else 'CPU'} time per step {result['seconds_per_step']:.4f} s, "
          f"of which matrix products and attention {result['matmul_share']:.1%}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
