"""The exponential moving average of the weights (diffusion.ema)."""

import pytest
import torch

from diffusion.training.ema import EMA


def test_update_is_the_moving_average_with_warmup():
    net = torch.nn.Linear(3, 2)
    ema = EMA(net, decay=0.99, warmup=True)
    expected = [p.detach().clone() for p in net.parameters()]
    for n in range(30):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ema.update(net)
        d = min(0.99, (1 + n) / (10 + n))
        expected = [
            d * e + (1 - d) * p.detach() for e, p in zip(expected, net.parameters(), strict=True)
        ]
    for e, p in zip(expected, ema.module.parameters(), strict=True):
        assert torch.allclose(e, p, atol=1e-6)
    assert int(ema.num_updates) == 30


def test_update_without_warmup_uses_the_fixed_decay():
    net = torch.nn.Linear(2, 2)
    ema = EMA(net, decay=0.9, warmup=False)
    before = [p.detach().clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net)
    for b, p, q in zip(before, ema.module.parameters(), net.parameters(), strict=True):
        assert torch.allclose(p, 0.9 * b + 0.1 * q)


def test_update_count_survives_a_state_dict_round_trip():
    net = torch.nn.Linear(2, 2)
    ema = EMA(net, decay=0.999)
    for _ in range(5):
        ema.update(net)
    other = EMA(net, decay=0.999)
    other.current_decay()  # caches n = 0 before loading
    other.load_state_dict(ema.state_dict())
    assert int(other.num_updates) == 5
    assert other.current_decay() == pytest.approx(6 / 15)
    assert not any(p.requires_grad for p in other.parameters())


@pytest.mark.parametrize("decay", [-0.1, 1.0])
def test_bad_decay_is_rejected(decay):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        EMA(torch.nn.Linear(1, 1), decay)
