"""Closed-form ε-predictors, for checking samplers without training anything.

For data x_0 ~ N(μ, s² I), q(x_t) = N(√ᾱ_t μ, (ᾱ_t s² + 1 - ᾱ_t) I), and the MMSE
ε-predictor (the minimiser of L_simple) is

    ε*(x_t, t) = E[ε | x_t] = √(1 - ᾱ_t) (x_t - √ᾱ_t μ) / (ᾱ_t s² + 1 - ᾱ_t).

Any correct sampler driven by ε* must return samples with mean μ and standard deviation s.
"""

from __future__ import annotations

import torch

from diffusion.process import GaussianDiffusion, gather


class GaussianEpsOracle(torch.nn.Module):
    """ε*(x_t, t) for data N(mean, std² I) under ``process`` (see module docstring)."""

    def __init__(self, process: GaussianDiffusion, mean: float, std: float) -> None:
        super().__init__()
        self.process = process
        self.mean = mean
        self.std = std

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha_bar = gather(self.process.alpha_bar, t, x_t)
        var_t = alpha_bar * self.std**2 + 1.0 - alpha_bar
        return (1.0 - alpha_bar).sqrt() * (x_t - alpha_bar.sqrt() * self.mean) / var_t
