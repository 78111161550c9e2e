"""AdamW kernel choices and in-place compilation (training/optim.py)."""
import pytest
import torch
from torch import nn

from divot import config as cfglib
from training import optim
from training.distill_detokenizer import DistillTrainConfig
from training.llm_setup import LLMTrainConfig
from training.tokenizer_setup import TokenizerTrainConfig


def _train(impl: str) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 3))
    groups = [{"params": [model[0].weight, model[2].weight], "weight_decay": 0.1},
              {"params": [model[0].bias, model[2].bias], "weight_decay": 0.0, "lr": 3e-3}]
    opt = optim.adamw(groups, lr=1e-2, betas=(0.9, 0.99), impl=impl)
    for step in range(4):
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_all_kernels_give_the_same_update():
    ref = _train("loop")
    start = [p.detach().clone() for p in nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 3)).parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(ref, start))
    for impl in ("foreach", "fused"):
        for a, b in zip(ref, _train(impl)):
            assert torch.allclose(a, b, atol=1e-6), impl


@pytest.mark.parametrize("config", [TokenizerTrainConfig, LLMTrainConfig, DistillTrainConfig])
def test_every_training_config_takes_the_options(config):
    cfg = cfglib.from_dict(config, {"optimizer_impl": "fused", "compile": True})
    assert (cfg.optimizer_impl, cfg.compile) == ("fused", True)
    assert config().optimizer_impl == "foreach" and config().compile is False
    with pytest.raises(cfglib.ConfigError, match="optimizer_impl"):
        cfglib.from_dict(config, {"optimizer_impl": "apex"})


def test_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match="optimizer_impl must be one of"):
        optim.adamw([nn.Parameter(torch.zeros(2))], lr=1e-3, betas=(0.9, 0.99), impl="apex")


def test_compile_in_place_keeps_names_and_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    before, keys = model(x).detach(), list(model.state_dict())
    assert optim.compile_modules(model, None, enabled=False) == []
    assert optim.compile_modules(model[0], None) == ["Linear"]
    assert list(model.state_dict()) == keys  # checkpoints and resumption see the same names
    assert torch.allclose(model(x), before, atol=1e-6)
