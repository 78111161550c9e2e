"""training/ema.py: the moving average of the tokenizer run's weights."""
import pytest
import torch
from torch import nn

from training.ema import TokenizerEMA, check_decay, decay_at


class Pair(nn.Module):
    """Stands in for TokenizerAutoencoder: the average only needs its two parts."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.tokenizer = nn.Linear(3, 2).to(dtype)
        self.detokenizer = nn.Linear(2, 3).to(dtype)


def _params(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _move(model: nn.Module, by: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(by)


def test_average_follows_the_warmup_decay_and_swaps_back():
    torch.manual_seed(0)
    model = Pair()
    start = _params(model)
    ema = TokenizerEMA(model, decay=0.9)
    assert decay_at(0.9, 1) == pytest.approx(2 / 11) and decay_at(0.9, 1000) == 0.9
    _move(model, 1.0)
    ema.step()  # decay 2/11
    _move(model, 1.0)
    ema.step()  # decay 3/12
    d1, d2 = 2 / 11, 3 / 12
    expect = (d1 * 0.0 + (1 - d1) * 1.0) * d2 + (1 - d2) * 2.0
    live = _params(model)
    with ema.averaged():
        for p, s in zip(model.parameters(), start):
            assert torch.allclose(p, s + expect)
    for p, q in zip(model.parameters(), live):
        assert torch.equal(p, q), "the live weights are back after the block"


def test_reset_tokenizer_restarts_only_the_tokenizer_average():
    model = Pair()
    ema = TokenizerEMA(model, decay=0.5)
    for _ in range(3):
        _move(model, 1.0)
        ema.step()
    det_avg = [s.clone() for s in ema.shadow["detokenizer"]]
    ema.reset_tokenizer()
    assert all(torch.equal(p, s) for p, s in zip(model.tokenizer.parameters(), ema.shadow["tokenizer"]))
    assert all(torch.equal(a, s) for a, s in zip(det_avg, ema.shadow["detokenizer"]))
    assert not all(torch.equal(p, s) for p, s in zip(model.detokenizer.parameters(), det_avg))
    for _ in range(2):  # a frozen tokenizer's average stays the frozen tokenizer
        ema.step()
    assert all(torch.equal(p, s) for p, s in zip(model.tokenizer.parameters(), ema.shadow["tokenizer"]))


def test_state_round_trip_and_float32_average_of_bf16_weights():
    model = Pair(torch.bfloat16)
    ema = TokenizerEMA(model, decay=0.99)
    expect = [s.clone() for s in ema.shadow["detokenizer"]]
    for k in range(1, 301):
        _move(model, 2 ** -6)
        ema.step()
        for e, p in zip(expect, model.detokenizer.parameters()):
            e.lerp_(p.detach().float(), 1 - decay_at(0.99, k))
    # The average is kept in float32: late in the run each step changes it by about 1e-4 of the
    # weights' scale, below bf16's resolution (2^-8 relative), where a bf16 average would stall.
    for s, e in zip(ema.shadow["detokenizer"], expect):
        assert s.dtype == torch.float32 and torch.allclose(s, e, rtol=0, atol=1e-6)
    assert ema.shadow["detokenizer"][0].to(torch.bfloat16).float().sub(ema.shadow["detokenizer"][0]).abs().max() > 0
    other = TokenizerEMA(Pair(torch.bfloat16), decay=0.99)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 300
    assert all(torch.equal(x, y) for n in ("tokenizer", "detokenizer")
               for x, y in zip(ema.shadow[n], other.shadow[n]))
    with pytest.raises(ValueError, match="expected"):
        other.load_state_dict({**ema.state_dict(), "shadow": {"tokenizer": ema.shadow["tokenizer"]}})
    with pytest.raises(ValueError, match="does not match"):
        TokenizerEMA(nn.ModuleDict({"tokenizer": nn.Linear(4, 2), "detokenizer": nn.Linear(2, 3)}),
                     0.9).load_state_dict(ema.state_dict())


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_decay_out_of_range_is_an_error(bad):
    with pytest.raises(ValueError, match="ema_decay"):
        check_decay(bad)
