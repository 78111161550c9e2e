"""Per-GPU memory plan of every training stage, paper preset, DeepSpeed ZeRO-2 with CPU optimizer offload.

    python scripts/memory_plan.py                        # 32 GPUs × 40 GiB (the paper's A100-40G cluster)
    python scripts/memory_plan.py --gpus 16 --seq-len sft-comp=2048 --json plan.json

Every number is COMPUTED, nothing is measured on a GPU (docs/MEMORY_PLAN.md explains the
terms). In short, with N GPUs and T the parameters a stage's optimizer holds:

* parameters: counted exactly from the paper-preset models built on the meta device (no
  weights, nothing downloads); the VAE is a diffusers ``AutoencoderKL`` of SD-1.x sizes.
* weights: every module in bf16 on every GPU (ZeRO-2 does not shard parameters; DeepSpeed bf16
  casts the whole engine module, frozen ViT/VAE included). The LLM stages also hold the frozen
  Divot tokenizer in fp32 (``llm.features`` loads it beside the engine).
* gradients: bf16 through the reduce buckets on the GPU (``reduce_bucket_size`` of
  ``training/configs/deepspeed_zero2_offload.json``, twice with ``overlap_comm``); each rank's fp32
  gradient partition (4·T/N bytes) and optimizer states (fp32 master + Adam m, v: 12·T/N) in CPU RAM.
* activations: what autograd keeps for the backward pass, per layer ``tokens × width × F`` bytes.
  ``F`` is counted, not guessed: a forward of one copy of each network (ViT cut to 1 frozen
  block, U-Net channels ÷ ``UNET_NARROW``, one Mistral layer at width ÷ ``LLM_NARROW``) runs on the
  CPU under ``torch.autograd.graph.saved_tensors_hooks``, adding up the distinct storages saved
  for backward, then scales by the width ratio (every saved tensor is linear in width).
  Gradient checkpointing (one checkpoint per U-Net ``SpaceTimeLayer`` / Mistral decoder layer)
  keeps each checkpointed layer's input plus one layer's full activations during recomputation.

Axes: b = clips or sequences per GPU, f = frames, c = channels, h, w = latent height, width,
L = sequence length, d = width.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from divot.detokenizer import DivotDetokenizer  # noqa: E402
from divot.presets import detokenizer_config, tokenizer_config  # noqa: E402
from divot.tokenizer import DivotTokenizer  # noqa: E402
from divot.unet import SpaceTimeLayer  # noqa: E402
from llm import lora  # noqa: E402
from llm.llm_config import llm_config  # noqa: E402
from llm.model import STAGES, DivotLLM  # noqa: E402
from training.tokenizer_setup import PAPER_OVERRIDES  # noqa: E402

GIB = 2 ** 30
# Stable Diffusion 1.x VAE (DESIGN.md §3: 4 latent channels, scale 0.18215, ×8 down-sampling).
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              layers_per_block=2, norm_num_groups=32, sample_size=256)
UNET_NARROW, LLM_NARROW = 5, 8  # width divisors of the counting copies (320 → 64 channels; 4096 → 512)
DS_ZERO2 = REPO / "training" / "configs" / "deepspeed_zero2_offload.json"
LLM_YAML = REPO / "training" / "configs" / "llm_paper.yaml"
TOKENIZER_STAGES = ("tokenizer stage 1", "tokenizer stage 2")


@dataclasses.dataclass(frozen=True)
class Assumptions:
    gpus: int = 32
    gpu_mem_gib: float = 40.0
    gpus_per_node: int = 8
    clips_per_gpu: int = PAPER_OVERRIDES["batch_size"]  # tokenizer training micro-batch
    seqs_per_gpu: int = 4  # training/configs/llm_paper.yaml batch_size
    # Pretrain: ≤ 4 clips × 66 tokens + caption; SFT-comp: 20 clips (DESIGN.md §2) × 66 + question;
    # SFT-gen: prompt + 66 query-block tokens.
    seq_len: tuple[tuple[str, int], ...] = (("pretrain", 512), ("sft-comp", 1420), ("sft-gen", 256))
    supervised_tokens: int = 64  # text tokens per sequence that reach the LM head (return_logits=False)


# --------------------------------------------------------------------------- parameters


def n_params(module: torch.nn.Module | None, trainable_only: bool = False) -> int:
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def build_models(preset: str, device: str = "meta") -> dict[str, torch.nn.Module | None]:
    """The preset's tokenizer, de-tokenizer, VAE (latent space only) and Divot-LLM, on ``device``."""
    from diffusers import AutoencoderKL

    with torch.device(device):
        tok = DivotTokenizer(tokenizer_config(preset))
        det = DivotDetokenizer(detokenizer_config(preset))
        vae = AutoencoderKL(**SD_VAE) if det.config.space == "latent" else None
        llm = DivotLLM(llm_config(preset, dtype="bfloat16"))
    return {"tokenizer": tok, "detokenizer": det, "vae": vae, "llm": llm}


def parameter_counts(preset: str = "paper") -> dict[str, int]:
    """Exact counts: whole models, their parts, and what each LLM stage trains."""
    m = build_models(preset)
    tok, det, llm = m["tokenizer"], m["detokenizer"], m["llm"]
    lora_n = sum(p.numel() for p in lora.lora_parameters(llm.lm).values())
    counts = {"tokenizer": n_params(tok), "vit": n_params(tok.vit), "detokenizer": n_params(det),
              "unet": n_params(det.unet), "vae": n_params(m["vae"]), "llm": n_params(llm),
              "llm_lora": lora_n, "llm_base": n_params(llm.lm) - lora_n,
              "input_projector": n_params(llm.input_projector), "output_projector": n_params(llm.output_projector),
              "llm_vocab": llm.base_model.get_input_embeddings().weight.shape[0]}
    for stage in STAGES:
        counts[f"llm_trainable/{stage}"] = llm.set_stage(stage)
    return counts


# --------------------------------------------------------------------------- activations


@contextmanager
def saved_tensor_counter(model: torch.nn.Module, owners: dict[str, torch.nn.Module] | None = None):
    """Counts bytes autograd saves for backward: each storage once, ``model``'s own weights and
    buffers left out, credited to the ``owners`` module running when it was first saved ("" outside
    them). Yields the name → bytes dict."""
    totals: dict[str, int] = {"": 0}
    seen = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    current = [""]
    hooks = []
    for name, module in (owners or {}).items():
        totals[name] = 0
        hooks.append(module.register_forward_pre_hook(lambda *_, n=name: current.__setitem__(0, n)))
        hooks.append(module.register_forward_hook(lambda *_: current.__setitem__(0, "")))

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            totals[current[0]] += storage.nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield totals
    finally:
        for h in hooks:
            h.remove()


def layer_inputs(layers: dict[str, torch.nn.Module]):
    """Forward pre-hooks recording each layer's first input size in bytes (its checkpoint)."""
    sizes: dict[str, int] = {}
    hooks = [m.register_forward_pre_hook(lambda _, args, n=name: sizes.__setitem__(n, args[0].nbytes))
             for name, m in layers.items()]
    return sizes, hooks


def unet_activations(preset: str) -> dict[str, float]:
    """Bytes per clip (bf16) of the de-tokenizer's context resampler and its U-Net, with and
    without per-layer checkpointing, from an fp32 forward (halved: no fp32-only activations)."""
    base = detokenizer_config(preset)
    narrow = [c // UNET_NARROW for c in base.unet.block_out_channels]
    det = DivotDetokenizer(detokenizer_config(preset, unet={"block_out_channels": narrow})).train()
    cfg = det.config
    tokens = torch.randn(1, cfg.num_tokens, cfg.token_dim)
    with saved_tensor_counter(det) as ctx_bytes:
        context = det.context(tokens)
    layers = {name: m for name, m in det.unet.named_modules() if isinstance(m, SpaceTimeLayer)}
    inputs, hooks = layer_inputs(layers)
    x = torch.randn(1, cfg.num_frames, cfg.x_channels, cfg.x_size, cfg.x_size)
    t = torch.randint(0, 1000, (1, cfg.num_frames))
    with saved_tensor_counter(det, layers) as unet_bytes:
        out = det.unet(x, t, context.detach())
    for h in hooks:
        h.remove()
    del out
    in_layers = sum(v for k, v in unet_bytes.items() if k)
    ckpt = unet_bytes[""] + sum(inputs.values()) + max(v for k, v in unet_bytes.items() if k)
    scale = UNET_NARROW / 2
    return {"context": ctx_bytes[""] / 2, "unet": (unet_bytes[""] + in_layers) * scale, "unet_ckpt": ckpt * scale}


def tokenizer_activations(preset: str) -> float:
    """Bytes per clip (bf16) the trainable tokenizer keeps; its frozen ViT runs without grad,
    so one ViT block gives the same saved tensors as the full depth."""
    tok = DivotTokenizer(tokenizer_config(preset, vit={"depth": 1})).train()
    frames = torch.rand(1, tok.config.num_frames, 3, tok.config.vit.img_size, tok.config.vit.img_size) * 2 - 1
    with saved_tensor_counter(tok) as saved:
        out = tok(frames)
    del out
    return saved[""] / 2


def llm_layer_activations(preset: str, seq_len: int) -> float:
    """Bytes one Mistral decoder layer with LoRA (bf16, dropout on) keeps for one sequence,
    counted on a copy with every width ÷ LLM_NARROW (head width kept) and scaled back."""
    cfg = llm_config(preset, dtype="bfloat16")
    d = LLM_NARROW
    narrow = dataclasses.replace(cfg, hidden_size=cfg.hidden_size // d, intermediate_size=cfg.intermediate_size // d,
                                 num_attention_heads=max(1, cfg.num_attention_heads // d),
                                 num_key_value_heads=max(1, cfg.num_key_value_heads // d), num_hidden_layers=1,
                                 lora_r=max(1, cfg.lora_r // d))
    lm = lora.wrap_lora(lora.build_base(narrow, 128), narrow).train()
    model = lm.get_base_model().model
    hidden = torch.randn(1, seq_len, narrow.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    rope = model.rotary_emb(hidden, torch.arange(seq_len)[None])
    # Causal without an explicit mask: the GPU's memory-efficient kernels keep no L × L scores
    # either (DivotLLM's 4-D mask is one b·L² tensor shared by all layers).
    with saved_tensor_counter(lm) as saved:
        out = model.layers[0](hidden, position_embeddings=rope, attention_mask=None)
    del out
    return saved[""] * d


# --------------------------------------------------------------------------- the plan


def zero2_buffers() -> int:
    """GPU bytes of ZeRO-2's bf16 gradient reduce buckets (two with overlap_comm)."""
    zero = json.loads(DS_ZERO2.read_text())["zero_optimization"]
    return int(zero["reduce_bucket_size"]) * 2 * (2 if zero.get("overlap_comm") else 1)


def vae_encode_transient(a: Assumptions) -> int:
    """No-grad VAE encoding of all b·f frames at once: about four 128-channel full-resolution
    maps live in the encoder's first block."""
    det = detokenizer_config("paper")
    return 4 * a.clips_per_gpu * det.num_frames * det.frame_size ** 2 * SD_VAE["block_out_channels"][0] * 2


def stage_row(name: str, a: Assumptions, trainable: int, weights: int, frozen_fp32: int, acts: float,
              acts_ckpt: float, transient: float = 0.0) -> dict:
    """One stage's per-GPU (and CPU) bytes under ZeRO-2 with optimizer offload."""
    n = a.gpus
    static = 2 * weights + 4 * frozen_fp32 + zero2_buffers()
    row = {"stage": name, "trainable": trainable, "weights": weights, "weights_bf16": 2 * weights,
           "frozen_fp32": 4 * frozen_fp32, "grad_buffers": zero2_buffers(), "activations": acts,
           "activations_ckpt": acts_ckpt, "transient": transient,
           "gpu_total": static + max(acts, transient), "gpu_total_ckpt": static + max(acts_ckpt, transient),
           "cpu_per_rank": 16 * trainable / n, "cpu_per_node": 16 * trainable / n * min(a.gpus_per_node, n)}
    row["fits"] = row["gpu_total"] <= a.gpu_mem_gib * GIB
    row["fits_ckpt"] = row["gpu_total_ckpt"] <= a.gpu_mem_gib * GIB
    return row


def tokenizer_rows(c: dict[str, int], a: Assumptions) -> tuple[list[dict], dict[str, float]]:
    """Stage 1 trains tokenizer (not the ViT) + de-tokenizer. Stage 2 keeps the tokenizer in the
    optimizer at learning rate 0 (training/tokenizer_setup.py): same T, no tokenizer activations."""
    u, tok = unet_activations("paper"), tokenizer_activations("paper")
    b = a.clips_per_gpu
    trainable = c["tokenizer"] - c["vit"] + c["detokenizer"]
    weights = c["tokenizer"] + c["detokenizer"] + c["vae"]
    rows = []
    for name, tok_acts in zip(TOKENIZER_STAGES, (tok, 0.0)):
        rows.append(stage_row(name, a, trainable, weights, 0, b * (tok_acts + u["context"] + u["unet"]),
                              b * (tok_acts + u["context"] + u["unet_ckpt"]), vae_encode_transient(a)))
    return rows, {"tokenizer_per_clip": tok, **{f"{k}_per_clip": v for k, v in u.items()}}


def llm_rows(c: dict[str, int], a: Assumptions) -> tuple[list[dict], dict[str, float]]:
    """The LLM stages: every layer keeps its activations, or (checkpointing) its bf16 input plus
    one recomputed layer; outside the layers, the final RMSNorm (10 bytes per element, like the
    layers' norms) and the CE on the supervised rows (bf16 logits, fp32 copy, log-softmax: 10 B)."""
    cfg = llm_config("paper")
    rows, per_layer = [], {}
    for stage, seq in a.seq_len:
        per_layer[stage] = layer = llm_layer_activations("paper", seq)
        b, tokens = a.seqs_per_gpu, a.seqs_per_gpu * seq
        outside = tokens * cfg.hidden_size * 10 + b * a.supervised_tokens * c["llm_vocab"] * 10
        full = b * layer * cfg.num_hidden_layers + outside
        ckpt = tokens * cfg.hidden_size * 2 * cfg.num_hidden_layers + b * layer + outside
        rows.append(stage_row(f"LLM {stage} (L={seq})", a, c[f"llm_trainable/{stage}"], c["llm"],
                              c["tokenizer"], full, ckpt))
    return rows, {f"llm_layer_per_seq/{k}": v for k, v in per_layer.items()}


def gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def markdown(rows: list[dict], a: Assumptions) -> str:
    head = ("| stage | trainable params | GPU: weights bf16 (+ frozen fp32) | GPU: grad buckets | "
            "GPU: activations (no ckpt / ckpt) | GPU: no-grad transient | GPU total (no ckpt / ckpt) | "
            f"fits {a.gpu_mem_gib:g} GiB (no ckpt / ckpt) | CPU RAM: optimizer + fp32 grads per rank / per node |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        frozen = f" (+ {gib(r['frozen_fp32'])})" if r["frozen_fp32"] else ""
        lines.append(
            f"| {r['stage']} | {r['trainable'] / 1e6:,.1f}M of {r['weights'] / 1e6:,.1f}M | "
            f"{gib(r['weights_bf16'])}{frozen} | {gib(r['grad_buffers'])} | "
            f"{gib(r['activations'])} / {gib(r['activations_ckpt'])} | {gib(r['transient'])} | "
            f"{gib(r['gpu_total'])} / {gib(r['gpu_total_ckpt'])} | "
            f"{'yes' if r['fits'] else 'NO'} / {'yes' if r['fits_ckpt'] else 'NO'} | "
            f"{gib(r['cpu_per_rank'])} / {gib(r['cpu_per_node'])} |")
    return "\n".join(lines)


def counts_markdown(c: dict[str, int], factors: dict[str, float]) -> str:
    lines = ["| count | value |", "|---|---|"]
    lines += [f"| params: {k} | {v:,} |" for k, v in c.items()]
    lines += [f"| activation bytes: {k} | {v / 2 ** 20:,.1f} MiB |" for k, v in factors.items()]
    return "\n".join(lines)


def parse_args(argv=None) -> tuple[argparse.Namespace, Assumptions]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = Assumptions()
    p.add_argument("--gpus", type=int, default=d.gpus)
    p.add_argument("--gpu-mem-gib", type=float, default=d.gpu_mem_gib)
    p.add_argument("--gpus-per-node", type=int, default=d.gpus_per_node)
    p.add_argument("--clips-per-gpu", type=int, default=d.clips_per_gpu, help="tokenizer training micro-batch")
    p.add_argument("--seqs-per-gpu", type=int, default=yaml.safe_load(LLM_YAML.read_text())["batch_size"],
                   help="LLM training micro-batch")
    p.add_argument("--seq-len", action="append", default=[], metavar="STAGE=L",
                   help=f"LLM sequence length of a stage (default {dict(d.seq_len)})")
    p.add_argument("--supervised-tokens", type=int, default=d.supervised_tokens)
    p.add_argument("--json", help="also write the rows and counts to this JSON file")
    args = p.parse_args(argv)
    seq = dict(d.seq_len)
    for item in args.seq_len:
        stage, _, value = item.partition("=")
        if stage not in seq or not value.isdigit():
            p.error(f"--seq-len takes STAGE=L with STAGE in {sorted(seq)}, got {item!r}")
        seq[stage] = int(value)
    if args.gpus < 1 or args.clips_per_gpu < 1 or args.seqs_per_gpu < 1:
        p.error("--gpus, --clips-per-gpu and --seqs-per-gpu must be >= 1")
    return args, Assumptions(args.gpus, args.gpu_mem_gib, args.gpus_per_node, args.clips_per_gpu,
                             args.seqs_per_gpu, tuple(seq.items()), args.supervised_tokens)


def main(argv=None) -> None:
    args, a = parse_args(argv)
    torch.manual_seed(0)
    counts = parameter_counts("paper")
    tok_rows, tok_factors = tokenizer_rows(counts, a)
    llm_rows_, llm_factors = llm_rows(counts, a)
    rows, factors = tok_rows + llm_rows_, {**tok_factors, **llm_factors}
    print(f"Computed (not measured) per-GPU memory, paper preset, DeepSpeed ZeRO-2 with CPU optimizer offload, "
          f"{a.gpus} GPUs × {a.gpu_mem_gib:g} GiB; {a.clips_per_gpu} clips or {a.seqs_per_gpu} sequences per GPU. "
          f"GiB = 2^30 bytes.\n")
    print(markdown(rows, a))
    print()
    print(counts_markdown(counts, factors))
    if args.json:
        Path(args.json).write_text(json.dumps({"assumptions": dataclasses.asdict(a), "rows": rows,
                                               "counts": counts, "activation_bytes": factors}, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
