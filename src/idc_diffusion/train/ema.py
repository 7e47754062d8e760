"""Exponential moving average of a model's trainable parameters.

The decay warms up as ``min(decay, (1 + k) / (10 + k))`` over the k-th update, so early
averages are not dominated by the initial weights. Shadows are float32 on the parameters'
device; ``state_dict``/``load_state_dict`` let accelerate checkpoint the average.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch


def ema_decay(decay: float, updates: int) -> float:
    """The effective decay at update number `updates` (0-based)."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


class EMA:
    """EMA of `parameters` (the trainable ones of a model), updated after each optimizer step."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], decay: float = 0.9999) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.parameters = list(parameters)
        self.decay, self.updates = decay, 0
        self.shadow = [p.detach().to(torch.float32).clone() for p in self.parameters]

    @torch.no_grad()
    def update(self) -> None:
        d = ema_decay(self.decay, self.updates)
        values = [p.detach().to(s) for s, p in zip(self.shadow, self.parameters, strict=True)]
        torch._foreach_lerp_(self.shadow, values, 1.0 - d)  # one kernel per group of tensors
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[torch.nn.Parameter] | None = None) -> None:
        """Write the averages into `parameters` (default: the tracked ones)."""
        targets = self.parameters if parameters is None else list(parameters)
        for shadow, param in zip(self.shadow, targets, strict=True):
            param.copy_(shadow.to(param))

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Within the block the tracked parameters hold the averages; restored after."""
        saved = [p.detach().clone() for p in self.parameters]
        self.copy_to()
        try:
            yield
        finally:
            with torch.no_grad():
                for param, value in zip(self.parameters, saved, strict=True):
                    param.copy_(value)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError("EMA checkpoint tracks a different number of parameters")
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
        for mine, saved in zip(self.shadow, state["shadow"], strict=True):
            mine.copy_(saved)
