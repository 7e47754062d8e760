"""The EMA of trainable weights: decay warm-up, averaging, swap, checkpoint state."""

from __future__ import annotations

import pytest
import torch

from idc_diffusion.train.ema import EMA, ema_decay


def test_decay_warms_up_to_its_ceiling() -> None:
    assert ema_decay(0.999, 0) == pytest.approx(0.1)
    assert ema_decay(0.999, 10) == pytest.approx(11 / 20)
    assert ema_decay(0.999, 10**6) == 0.999


def test_average_matches_the_recurrence() -> None:
    layer = torch.nn.Linear(3, 2)
    start = layer.weight.detach().clone()
    ema = EMA(layer.parameters(), decay=0.5)
    want = start.clone()
    for k in range(4):
        with torch.no_grad():
            layer.weight.add_(1.0)
        ema.update()
        d = min(0.5, (1 + k) / (10 + k))
        want = d * want + (1 - d) * layer.weight.detach()
    assert torch.allclose(ema.shadow[0], want)
    current = layer.weight.detach().clone()
    with ema.swapped():
        assert torch.allclose(layer.weight, want)
    assert torch.equal(layer.weight, current)


def test_state_roundtrip_and_mismatch() -> None:
    layer = torch.nn.Linear(3, 2)
    ema = EMA(layer.parameters(), decay=0.9)
    with torch.no_grad():
        layer.weight.mul_(2)
    ema.update()
    other = EMA(torch.nn.Linear(3, 2).parameters(), decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1
    assert all(torch.equal(a, b) for a, b in zip(other.shadow, ema.shadow, strict=True))
    with pytest.raises(ValueError, match="different number"):
        EMA([layer.weight], 0.9).load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match="ema_decay"):
        EMA(layer.parameters(), decay=1.0)
