"""Closed-form ε-predictors, for checking samplers without training anything.

For a kernel q(x_t | x_0) = N(m x_0, σ² I) (DDPM: m = √ᾱ_t, σ² = 1 - ᾱ_t; the SDEs and NCSN:
their own m, σ) and data x_0 ~ N(μ, s² I), q(x_t) = N(m μ, (m² s² + σ²) I), and the MMSE
ε-predictor (the minimiser of L_simple and of denoising score matching) is

    ε*(x_t) = E[ε | x_t] = σ (x_t - m μ) / (m² s² + σ²),

i.e. the exact score -(x_t - m μ) / (m² s² + σ²) times -σ. Any correct sampler driven by ε*
must return samples with mean μ and standard deviation s.
"""

from __future__ import annotations

import torch


class GaussianEpsOracle(torch.nn.Module):
    """ε*(x_t, label) for data N(mean, std² I) under ``process``, any family: it needs the
    process's ``moments_at_label(label) -> (m, σ)`` (see module docstring)."""

    def __init__(self, process, mean: float, std: float) -> None:
        super().__init__()
        self.process = process
        self.mean = mean
        self.std = std

    def forward(self, x_t: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        m, sigma = self.process.moments_at_label(label)
        shape = (-1, *([1] * (x_t.ndim - 1)))
        m, sigma = m.to(x_t).reshape(shape), sigma.to(x_t).reshape(shape)
        return sigma * (x_t - m * self.mean) / (m**2 * self.std**2 + sigma**2)
