"""scripts/bench.py (every section on the tiny preset, the MFU formula) and scripts/memory_plan.py
(exact parameter counts, the saved-tensor counter, the per-GPU arithmetic)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from divot.detokenizer import DivotDetokenizer
from divot.presets import detokenizer_config, tokenizer_config
from divot.tokenizer import DivotTokenizer
from llm.llm_config import llm_config
from llm.model import STAGES, DivotLLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench  # noqa: E402
import memory_plan  # noqa: E402
import profile_llm_step  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# Mistral-7B-v0.1 (vocabulary 32000) has 7,241,732,096 parameters; Divot adds 70 rows to the
# untied embedding and LM head.
MISTRAL_7B = 7_241_732_096
ADDED_ROWS = 2 * 70 * 4096


def test_bench_tiny_reports_every_section(tmp_path):
    out = tmp_path / "bench.json"
    results = bench.main(["--batch-size", "1", "--seq-len", "192", "--decode-steps", "1,2", "--e2e-steps", "1",
                          "--text-tokens", "2", "--warmup", "0", "--iters", "1", "--optimizer-impl", "loop",
                          "--output", str(out)])
    assert results["optimizer_impl"] == "loop" and results["compile"] is False
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    sections = results["sections"]
    assert list(sections) == list(bench.SECTIONS)
    expected = {"tokenizer_encode": ["clips_per_s"], "detokenizer_train": ["stage1_step_s", "stage2_step_s"],
                "detokenizer_decode": ["steps_1_s", "steps_2_s"],
                "llm_train": ["step_s", "tokens_per_s", "flops_per_step", "achieved_tflops"],
                "generation": ["text_tokens_per_s", "prompt_to_video_s"]}
    for name, keys in expected.items():
        for key in keys + ["peak_rss_gib"]:
            assert sections[name][key] > 0, (name, key)
    assert sections["llm_train"]["mfu"] is None  # the CPU has no peak in the table
    assert sections["llm_train"]["tokens_per_s"] == pytest.approx(192 / sections["llm_train"]["step_s"])


def test_bench_llm_holds_every_weight_in_the_dtype():
    # peft keeps fresh adapters in float32 beside a bf16 base; DeepSpeed bf16 would cast them,
    # and a bench that left them in float32 timed fp32 adapter GEMMs (0.37 s vs 0.21 s on an H100).
    model = bench.build_llm("tiny", torch.device("cpu"), torch.bfloat16, grad_ckpt=False)
    dtypes = {p.dtype for n, p in model.named_parameters()}
    assert dtypes == {torch.bfloat16} and any("lora_A" in n for n, _ in model.named_parameters())


def test_profile_llm_step_tiny(capsys):
    result = profile_llm_step.main(["--steps", "1", "--warmup", "0", "--batch-size", "1", "--seq-len", "192",
                                    "--top", "40"])
    out = capsys.readouterr().out
    assert result["clock"] == "cpu" and result["seconds_per_step"] > 0
    assert 0 < result["matmul_share"] < 1 and "aten::mm" in out
    assert json.loads(out.strip().splitlines()[-1]) == result
    assert profile_llm_step.matmul_share({"aten::mm": 3.0, "aten::mul": 1.0}) == pytest.approx(0.75)
    with pytest.raises(SystemExit):
        profile_llm_step.parse_args(["--preset", "paper"])


def test_bench_refuses_paper_on_cpu_and_bad_sections(capsys):
    for argv in (["--preset", "paper"], ["--only", "tokenizer_encode,nope"], ["--decode-steps", "0"],
                 ["--seq-len", "100"], ["--compile", "--warmup", "0"], ["--optimizer-impl", "apex"]):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
    assert "--force" in capsys.readouterr().err


def test_mfu_formula_by_hand():
    # N = 1e9 frozen-or-not params every token meets, 1e8 of them trained, 1000 tokens:
    # 2·N·T forward + 2·N·T activation grads + 2·N_t·T weight grads = (4e9 + 2e8)·1000 = 4.2e12,
    # plus a 1e6-parameter LM head on 10 supervised rows trained in full: 6·1e6·10 = 6e7.
    flops = bench.llm_step_flops(10 ** 9, 10 ** 8, 1000, head_params=10 ** 6, head_rows=10)
    assert flops == 4.2e12 + 6e7
    assert bench.mfu(4.2e12, seconds=2.0, peak_flops=1e13) == pytest.approx(0.21)
    assert bench.mfu(4.2e12, 2.0, None) is None
    assert bench.peak_flops_of(torch.device("cpu"), None) is None
    assert bench.peak_flops_of(torch.device("cpu"), 5e14) == 5e14


def test_llm_flop_counts_partition_the_model():
    model = DivotLLM(llm_config("tiny"))
    n, n_t, head = bench.llm_flop_counts(model)
    embed = model.base_model.get_input_embeddings().weight.numel()
    proj = sum(p.numel() for p in [*model.input_projector.parameters(), *model.output_projector.parameters()])
    assert n + head + embed + proj == model.num_parameters()
    lora = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    assert lora < n_t < n  # LoRA and the RMSNorms train; the base projections do not


def test_memory_plan_counts_match_the_real_tiny_models():
    counts = memory_plan.parameter_counts("tiny")
    real_tok = DivotTokenizer(tokenizer_config("tiny"))
    real_det = DivotDetokenizer(detokenizer_config("tiny"))
    real_llm = DivotLLM(llm_config("tiny"))
    assert counts["tokenizer"] == sum(p.numel() for p in real_tok.parameters())
    assert counts["vit"] == sum(p.numel() for p in real_tok.vit.parameters())
    assert counts["detokenizer"] == sum(p.numel() for p in real_det.parameters())
    assert counts["vae"] == 0  # pixel space
    assert counts["llm"] == sum(p.numel() for p in real_llm.parameters())
    for stage in STAGES:
        real_llm.set_stage(stage)
        assert counts[f"llm_trainable/{stage}"] == sum(p.numel() for p in real_llm.parameters() if p.requires_grad)


def test_memory_plan_paper_counts():
    counts = memory_plan.parameter_counts("paper")
    assert counts["llm_base"] == pytest.approx(MISTRAL_7B + ADDED_ROWS, rel=0.01)
    assert counts["llm_vocab"] == 32000 + 70
    # LoRA r = 32 on q, k, v, o (4096 → 4096/1024) and gate, up, down (4096 ↔ 14336), 32 layers.
    assert counts["llm_lora"] == 32 * 32 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))
    # DESIGN.md §9: the released tokenizer without its ViT has 171.6M parameters.
    assert counts["tokenizer"] - counts["vit"] == pytest.approx(171.6e6, rel=1e-3)


def test_saved_tensor_counter_counts_activations_not_weights():
    lin = nn.Linear(8, 4)
    x = torch.randn(5, 8, requires_grad=True)
    with memory_plan.saved_tensor_counter(lin) as saved:
        y = lin(x).sigmoid()
    # addmm keeps x (5·8 floats; the weight is excluded), sigmoid keeps its output (5·4 floats).
    assert saved[""] == (5 * 8 + 5 * 4) * 4
    del y


def test_memory_plan_row_arithmetic():
    a = memory_plan.Assumptions(gpus=32, gpu_mem_gib=40.0, gpus_per_node=8)
    gib = memory_plan.GIB
    row = memory_plan.stage_row("x", a, trainable=3_200_000_000, weights=10 ** 9, frozen_fp32=10 ** 8,
                                acts=5 * gib, acts_ckpt=gib, transient=2 * gib)
    static = 2 * 10 ** 9 + 4 * 10 ** 8 + memory_plan.zero2_buffers()
    assert row["gpu_total"] == static + 5 * gib and row["gpu_total_ckpt"] == static + 2 * gib
    # fp32 master + Adam m, v (12 B) and the fp32 gradient partition (4 B), split over 32 ranks.
    assert row["cpu_per_rank"] == 16 * 3_200_000_000 / 32 and row["cpu_per_node"] == 8 * row["cpu_per_rank"]
    assert row["fits"] and row["fits_ckpt"]
    big = memory_plan.stage_row("y", a, 1, 20 * gib, 0, 0.0, 0.0)
    assert not big["fits"]  # 40 GiB of bf16 weights alone
