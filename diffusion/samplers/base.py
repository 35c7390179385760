"""What every sampler shares: the callback's view of a step, the noise, and the declaration of
what a sampler needs from a process.

Every sampler is a free function with one signature,

    sampler(model, x_T, process, *, generator=None, callback=None, **options) -> x_0

``model`` is a :class:`~diffusion.processes.prediction.Predictor` (``model(x_t, t)`` gives a
Prediction: ε̂, x̂_0, score, v̂), ``x_T`` standard normal noise (B, C, H, W), scaled by the
sampler to the process's ``prior_std``, ``process`` the kernel (diffusion.processes), and
``generator`` the source of the sampler's own noise (so a seed fixes the whole chain).
``callback`` receives a :class:`Step` after every network evaluation. Each sampler is marked with
:func:`needs`: the view of the process it runs on (one of a process's ``offers``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from diffusion.processes.kernel import batch_of


@dataclass
class Step:
    """State handed to a sampler's callback after each network evaluation."""

    t: float  #: the process time of x_t (DDPM: code index; SDE: t; NCSN: level)
    x_t: torch.Tensor  #: the sample the network saw
    x_next: torch.Tensor  #: the sample after this step (x_0 at the last step)
    x0_hat: torch.Tensor  #: the model's prediction of x_0
    nfe: int  #: network evaluations so far


Callback = Callable[[Step], None]
F = TypeVar("F", bound=Callable)


def needs(view: str, learned_variance: bool = False) -> Callable[[F], F]:
    """Mark a sampler with the process view it runs on (``chain``, ``sde`` or ``levels``) and
    whether it uses a learned variance (the others use the learned mean only)."""

    def mark(fn: F) -> F:
        fn.needs = view
        fn.uses_learned_variance = learned_variance
        return fn

    return mark


def noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """z ~ N(0, I) shaped like x, from ``generator``."""
    return torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)


__all__ = ["Callback", "Step", "batch_of", "needs", "noise"]
