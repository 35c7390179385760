"""Prediction targets and the one adapter from a network's output to ε̂, x̂_0, score and v̂.

For any kernel x_t = m x_0 + σ ε (diffusion.processes.kernel) a network may predict

    eps:  ε                                       (Ho et al. 2020)
    x0:   x_0                                     (the data itself)
    v:    v = m ε - σ x_0                         (Salimans & Ho 2022, α_t ε - σ_t x_0 for VP)

and each determines the others given x_t:

    from ε̂:  x̂_0 = (x_t - σ ε̂) / m
    from x̂_0: ε̂ = (x_t - m x̂_0) / σ
    from v̂:  x̂_0 = (m x_t - σ v̂) / (m² + σ²),   ε̂ = (σ x_t + m v̂) / (m² + σ²)

(m x_t - σ v = (m² + σ²) x_0; for VP, m² + σ² = 1). The score is s = ∇ log q_t(x_t) = -ε̂ / σ
(Tweedie), and the MSE of each target is the x_0-MSE times a factor (:func:`mse_factor`):
‖ε - ε̂‖² = SNR ‖x_0 - x̂_0‖², ‖v - v̂‖² = (m² + σ²)² / σ² ‖x_0 - x̂_0‖² (SNR + 1 for VP).

:class:`Predictor` is the only place that knows the target: samplers, likelihoods, the FID
callback and the pictures call it and read a :class:`Prediction`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from diffusion.processes.kernel import Process, per_example

TARGETS = ("eps", "x0", "v")

Network = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""A network ``raw = net(x_t, label)``: raw has x_t's shape (twice its channels with a learned
variance)."""


def check_target(target: str) -> str:
    if target not in TARGETS:
        raise ValueError(f"prediction must be one of {list(TARGETS)}, got {target!r}")
    return target


def target_value(
    target: str, x0: torch.Tensor, eps: torch.Tensor, m: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """What a network of this ``target`` should output for x_t = m x_0 + σ ε (m, σ broadcast)."""
    if target == "eps":
        return eps
    if target == "x0":
        return x0
    if target == "v":
        return m * eps - sigma * x0
    raise ValueError(f"prediction must be one of {list(TARGETS)}, got {target!r}")


def eps_x0_from(
    target: str, raw: torch.Tensor, x_t: torch.Tensor, m: torch.Tensor, sigma: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ε̂, x̂_0) from a network output ``raw`` of this ``target`` at x_t (module docstring)."""
    if target == "eps":
        return raw, (x_t - sigma * raw) / m
    if target == "x0":
        return (x_t - m * raw) / sigma, raw
    if target == "v":
        norm = m * m + sigma * sigma
        return (sigma * x_t + m * raw) / norm, (m * x_t - sigma * raw) / norm
    raise ValueError(f"prediction must be one of {list(TARGETS)}, got {target!r}")


def mse_factor(target: str, m: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """c with ‖target - target̂‖² = c ‖x_0 - x̂_0‖² at fixed x_t: SNR for ε, 1 for x_0,
    (m² + σ²)² / σ² for v (SNR + 1 for VP)."""
    if target == "eps":
        return (m / sigma) ** 2
    if target == "x0":
        return torch.ones_like(m)
    if target == "v":
        return (m * m + sigma * sigma) ** 2 / sigma**2
    raise ValueError(f"prediction must be one of {list(TARGETS)}, got {target!r}")


@dataclass(frozen=True)
class Prediction:
    """What the model says about x_t: tensors shaped like x_t, (m, σ) shaped to broadcast."""

    x_t: torch.Tensor
    m: torch.Tensor
    sigma: torch.Tensor
    eps_hat: torch.Tensor
    x0_hat: torch.Tensor
    var_frac: torch.Tensor | None = None
    """A learned variance's interpolation weight in [0, 1] ((v + 1) / 2 of Nichol & Dhariwal
    2021, Eq. 15): σ² = exp(frac log β + (1 - frac) log β̃); None for a fixed variance."""

    @property
    def score(self) -> torch.Tensor:
        """s = ∇ log q_t(x_t) ≈ -ε̂ / σ."""
        return -self.eps_hat / self.sigma

    @property
    def v_hat(self) -> torch.Tensor:
        """v̂ = m ε̂ - σ x̂_0."""
        return self.m * self.eps_hat - self.sigma * self.x0_hat

    def clipped(self) -> Prediction:
        """x̂_0 clipped to the data range [-1, 1], ε̂ recomputed from it (at the same x_t)."""
        x0 = self.x0_hat.clamp(-1.0, 1.0)
        return replace(self, x0_hat=x0, eps_hat=(self.x_t - self.m * x0) / self.sigma)


class Predictor:
    """A network seen through its process and prediction target: ``model(x_t, t) ->``
    :class:`Prediction`, with t the process's times (B,).

    Args:
        net: ``raw = net(x_t, label)``.
        process: the kernel and the label (diffusion.processes.kernel.Process).
        target: ``eps``, ``x0`` or ``v``.
        learn_sigma: the network outputs twice the channels; the second half is the variance
            interpolation v ∈ [-1, 1] of Nichol & Dhariwal 2021.
    """

    def __init__(
        self, net: Network, process: Process, target: str = "eps", learn_sigma: bool = False
    ) -> None:
        self.net, self.process = net, process
        self.target, self.learn_sigma = check_target(target), learn_sigma

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> Prediction:
        m, sigma = self.process.marginal(t)
        m, sigma = per_example(m, x_t), per_example(sigma, x_t)
        raw = self.net(x_t, self.process.label(t))
        var_frac = None
        if self.learn_sigma:
            raw, v = raw.chunk(2, dim=1)
            var_frac = (v + 1) / 2
        eps_hat, x0_hat = eps_x0_from(self.target, raw, x_t, m, sigma)
        return Prediction(x_t, m, sigma, eps_hat, x0_hat, var_frac)
