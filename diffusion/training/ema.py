"""Exponential moving average of a network's weights (Polyak averaging, as in DDPM's sampling).

θ_ema ← decay · θ_ema + (1 - decay) · θ after every optimizer step, done with one fused
``torch._foreach_lerp_`` over all parameters instead of a Python loop. Buffers (none in our
U-Net, but e.g. BatchNorm statistics elsewhere) are copied. The copy is an ``nn.Module`` so it is
saved in and restored from the LightningModule's ``state_dict`` with everything else.

With ``warmup`` the decay used at update n is min(decay, (1 + n) / (10 + n)), as TensorFlow's
``ExponentialMovingAverage(num_updates=n)``: early averages are not dominated by the random
initial weights, which matters for short runs (a 0.9999 average needs ~10k steps to forget them).
The update count is a buffer, so it survives checkpoints.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """Holds ``module``'s averaged copy in ``self.module``; call :meth:`update` after each step."""

    def __init__(self, module: nn.Module, decay: float, warmup: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.module = copy.deepcopy(module).requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        # host copy of num_updates, so an update needs no device sync; refreshed after loading
        self._n: int | None = None
        self.register_load_state_dict_post_hook(lambda ema, keys: setattr(ema, "_n", None))

    def current_decay(self) -> float:
        if self._n is None:
            self._n = int(self.num_updates)
        n = self._n
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in module.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - self.current_decay())
        self.num_updates += 1
        self._n += 1
        for ema_buf, buf in zip(self.module.buffers(), module.buffers(), strict=True):
            ema_buf.copy_(buf)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.module(*args)
