"""training/train_llm.py end to end: config errors, pretrain → merged → SFT stages, kill + resume, DeepSpeed.

The stage runs share one pretraining run (module fixture), which also serves as the
uninterrupted reference of the kill + resume test: subprocess start-up (torch, transformers,
peft imports) is most of each run's time on a 2-core machine.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from divot import config as cfglib
from _launch import free_port, subprocess_env
from training import train_llm
from training.llm_setup import LLMTrainConfig, build_sources, expand_presets, pipeline_info

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "training" / "train_llm.py"
FAST = ["batch_size=2", "log_every=1", "data.feature_batch_size=8"]
PRETRAIN_STEPS, SAVE_EVERY = 30, 10
PRETRAIN = ["--stage", "pretrain", f"steps={PRETRAIN_STEPS}", "warmup_steps=3", f"save_every={SAVE_EVERY}", *FAST]
SFT = ["steps=3", "warmup_steps=1", "save_every=10", "lr=3e-3", *FAST]


def _env1() -> dict:
    # One thread: the tiny model's ops are too small to gain from a second one, and the
    # results must not depend on how busy the machine is (bitwise-equal resume).
    return subprocess_env(OMP_NUM_THREADS="1", DIVOT_NUM_THREADS="1")


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=_env1(), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Divot-LLM checkpoint directory, keyed by file and name."""
    out = {}
    for f in sorted(directory.rglob("*.safetensors")):
        out.update({f"{f.relative_to(directory)}:{k}": v for k, v in load_file(str(f)).items()})
    return out


def _projector(directory: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(directory / name / "model.safetensors"))


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory, tokenizer_dir) -> tuple[Path, float]:
    out = tmp_path_factory.mktemp("llm") / "pretrain"
    start = time.time()
    proc = _run(["--output-dir", str(out), f"tokenizer_dir={tokenizer_dir}", *PRETRAIN])
    assert "final loss" in proc.stdout and "merged" in proc.stdout
    return out, time.time() - start


def _main_error(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        train_llm.main(argv)
    return str(exc.value.code)


def test_config_and_input_errors(tmp_path, tokenizer_dir):
    out = tmp_path / "run"
    assert "unknown config key" in _main_error(["--output-dir", str(out), "data.ratioz.caption=1"])
    assert "unknown config key" in _main_error(["--output-dir", str(out), "lrr=1"])
    msg = _main_error(["--output-dir", str(out), f"tokenizer_dir={tmp_path / 'none'}"])
    assert "pretrain_tokenizer.py" in msg and str(tmp_path / "none") in msg
    msg = _main_error(["--stage", "sft-comp", "--output-dir", str(out), f"tokenizer_dir={tokenizer_dir}",
                       f"init_from={tmp_path / 'no_pretrain'}"])
    assert "run the pretrain stage first" in msg and "no_pretrain" in msg
    assert "source must be one of" in _main_error(["data.source=folder"])
    msg = _main_error(["--output-dir", str(out), f"tokenizer_dir={tokenizer_dir}", "llm.token_dim=16"])
    assert "64×32 tokens but the LLM expects 64×16" in msg
    assert not out.exists()  # nothing was built or written


def test_stage_defaults_and_mixture():
    for stage, out_dir, ratios in (("pretrain", "runs/llm_pretrain", {"caption": 1.3, "generate": 1.0}),
                                   ("sft-comp", "runs/llm_sft_comp", {"qa": 1.0, "chat": 1.0}),
                                   ("sft-gen", "runs/llm_sft_gen", {"generate": 1.0})):
        cfg = cfglib.from_dict(LLMTrainConfig, expand_presets({"stage": stage}))
        assert cfg.output_dir == out_dir
        assert cfg.init_from == (None if stage == "pretrain" else "runs/llm_pretrain/merged")
        assert {k: v for k, v in cfglib.to_dict(cfg.data.ratios).items() if v} == ratios
    # tiny: both SFT stages get more samples than pretraining, in batches of 16 (docs/RESULTS.md).
    steps = {stage: (c.steps, c.batch_size) for stage in ("pretrain", "sft-comp", "sft-gen")
             for c in [cfglib.from_dict(LLMTrainConfig, expand_presets({"stage": stage}))]}
    assert steps == {"pretrain": (400, 4), "sft-comp": (1500, 16), "sft-gen": (1500, 16)}
    assert cfglib.from_dict(LLMTrainConfig, expand_presets({"stage": "sft-comp", "batch_size": 2})).batch_size == 2
    paper = cfglib.from_dict(LLMTrainConfig, expand_presets({"preset": "paper"}))
    assert (paper.lr, paper.warmup_steps, paper.betas, paper.eps, paper.weight_decay) == (1e-4, 500, (0.9, 0.98),
                                                                                         1e-6, 0.05)
    assert paper.llm.hidden_size == 4096 and paper.llm.token_dim == 256
    # sft-comp without a conversation file trains on Shapes QA alone.
    sources = build_sources(cfglib.from_dict(LLMTrainConfig, expand_presets({"stage": "sft-comp"})))
    assert list(sources) == ["qa"] and sources["qa"][0]["task"] == "qa"


def test_example_configs_resolve_for_every_stage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/llm_pretrain/merged here, whatever the checkout holds
    for path in sorted((REPO / "training" / "configs").glob("llm_*.yaml")):
        for stage in ("pretrain", "sft-comp", "sft-gen"):
            data = cfglib.merge(cfglib.load_yaml(path), {"stage": stage})
            cfg = cfglib.from_dict(LLMTrainConfig, expand_presets(data))
            assert cfg.stage == stage
            if stage != "pretrain":  # the pretrain stage's base model is not where SFT starts
                assert cfg.llm.base_path is None


def test_user_sources_and_skipped_batches(tmp_path):
    (tmp_path / "caps.jsonl").write_text(json.dumps({"video": "a.mp4", "caption": "a red circle"}) + "\n")
    (tmp_path / "conv.json").write_text(json.dumps([{"video": "a.mp4", "conversations": [
        {"from": "human", "value": "<video>\nWhat moves?"}, {"from": "gpt", "value": "a circle"}]}]))
    base = {"data": {"source": "jsonl", "jsonl": str(tmp_path / "caps.jsonl")}}
    pre = build_sources(cfglib.from_dict(LLMTrainConfig, expand_presets(base)))
    assert sorted(pre) == ["caption", "generate"] and pre["generate"][0]["task"] == "generate"
    comp = cfglib.merge(base, {"stage": "sft-comp", "data": {"conversations": str(tmp_path / "conv.json")}})
    assert list(build_sources(cfglib.from_dict(LLMTrainConfig, expand_presets(comp)))) == ["chat"]  # no qa
    with pytest.raises(ValueError, match="no training data"):
        build_sources(cfglib.from_dict(LLMTrainConfig, expand_presets({**base, "stage": "sft-comp"})))
    # All-unreadable batches are skipped and counted; their count moves the data position on resume.
    empty = {"input_ids": torch.zeros(0, 0), "num_corrupt": 2}
    good = {"input_ids": torch.zeros(1, 5), "num_corrupt": 1}
    counters = {"corrupt": 0, "skipped": 0}
    assert train_llm.next_batch(iter([empty, empty, good]), counters) is good
    assert counters == {"corrupt": 5, "skipped": 2}
    acc = type("Acc", (), {"num_processes": 2, "process_index": 1})()
    state = {"counters": {"corrupt_by_rank": [0, 5], "skipped_by_rank": [0, 2]}}
    assert train_llm.resume_counters(state, acc) == {"corrupt": 5, "skipped": 2}
    assert train_llm.resume_counters(None, acc) == {"corrupt": 0, "skipped": 0}


@pytest.mark.slow
def test_pretrain_learns_and_writes_final_and_merged(pretrain_run, tokenizer_dir):
    out, _ = pretrain_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, PRETRAIN_STEPS + 1))
    first = sum(r["loss/ce"] for r in rows[:5]) / 5
    last = sum(r["loss/ce"] for r in rows[-5:]) / 5
    assert last < first - 1.5, (first, last)  # random init: ce ≈ ln(32070) ≈ 10.4
    gmm = [r["loss/gmm"] for r in rows if "loss/gmm" in r]  # steps without generation samples log none
    assert 10 <= len(gmm) < len(rows)
    assert sum(gmm[-5:]) / 5 < sum(gmm[:5]) / 5 - 0.3, gmm
    for name in ("final", "merged"):
        info = json.loads((out / name / "pipeline.json").read_text())
        assert info == {"tokenizer": str(tokenizer_dir.resolve()), "detokenizer": None}
        assert json.loads((out / name / "config.json").read_text())["_layout"] == ("lora" if name == "final"
                                                                                 else "merged")
    assert (out / "merged" / "llm" / "config.json").is_file() and (out / "tb").is_dir()
    assert (out / "config.yaml").is_file()


@pytest.mark.slow
def test_sft_stages_freeze_their_projector(pretrain_run, tokenizer_dir, tmp_path):
    merged = pretrain_run[0] / "merged"
    for stage, frozen, trained in (("sft-comp", "output_projector", "input_projector"),
                                   ("sft-gen", "input_projector", "output_projector")):
        out = tmp_path / stage
        proc = _run(["--stage", stage, "--output-dir", str(out), f"tokenizer_dir={tokenizer_dir}",
                     f"init_from={merged}", *SFT])
        assert f"{stage}: wrote {out / 'final'} after 3 steps" in proc.stdout
        assert (out / "final" / "pipeline.json").is_file() and not (out / "merged").exists()
        for k, v in _projector(merged, frozen).items():
            assert torch.equal(v, _projector(out / "final", frozen)[k]), f"{stage}: frozen {frozen}.{k} moved"
        assert any(not torch.equal(v, _projector(out / "final", trained)[k])
                   for k, v in _projector(merged, trained).items()), f"{stage}: {trained} did not train"
        lora = load_file(str(out / "final" / "lora" / "adapter_model.safetensors"))
        assert any("lora_B" in k and v.abs().sum() > 0 for k, v in lora.items())  # the fresh LoRA trained


@pytest.mark.slow
def test_killed_run_resumes_to_identical_weights(pretrain_run, tokenizer_dir, tmp_path):
    straight, killed = pretrain_run[0], tmp_path / "killed"
    args = ["--output-dir", str(killed), f"tokenizer_dir={tokenizer_dir}", *PRETRAIN]
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=REPO, env=_env1(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "checkpoints" / f"step_{SAVE_EVERY:08d}" / "trainer_state.json").exists():
        assert proc.poll() is None, "training exited before it could be interrupted"
        assert time.time() < deadline, "no checkpoint within 240 s"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists()
    out = _run([*args, "--resume"])
    assert "resumed from" in out.stderr + out.stdout
    a, b = _weights(straight / "final"), _weights(killed / "final")
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


@pytest.mark.slow
def test_two_process_deepspeed_zero2(tmp_path, tokenizer_dir):
    pytest.importorskip("deepspeed")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "training/configs/accelerate_cpu_zero2.yaml"), "--num_processes", "2",
           "--main_process_port", str(free_port()), str(SCRIPT), "--output-dir", str(tmp_path),
           f"tokenizer_dir={tokenizer_dir}", "--stage", "pretrain", "steps=3", "warmup_steps=1", *FAST]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "DEEPSPEED" in (tmp_path / "runtime.yaml").read_text().upper()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["loss"] == r["loss"] for r in rows)  # finite, logged once per step
    from llm.model import DivotLLM
    model = DivotLLM.from_pretrained(tmp_path / "merged")
    assert model.config.token_dim == 32 and (tmp_path / "final" / "pipeline.json").is_file()


def test_pipeline_info_finds_the_sibling_detokenizer(tmp_path):
    (tmp_path / "tokenizer").mkdir()
    assert pipeline_info(tmp_path / "tokenizer")["detokenizer"] is None
    (tmp_path / "detokenizer").mkdir()
    (tmp_path / "detokenizer" / "config.json").write_text("{}")
    info = pipeline_info(tmp_path / "tokenizer")
    assert info == {"tokenizer": str((tmp_path / "tokenizer").resolve()),
                    "detokenizer": str((tmp_path / "detokenizer").resolve())}
