"""Closed-form optimal networks for Gaussian data, for checking samplers without training.

For a kernel q(x_t | x_0) = N(m x_0, σ² I) and data x_0 ~ N(μ, s² I), q(x_t) = N(m μ, (m² s² +
σ²) I), and the MMSE predictions (the minimisers of every target's MSE) are

    ε*(x_t)  = E[ε | x_t]   = σ (x_t - m μ) / (m² s² + σ²),
    x_0*(x_t) = E[x_0 | x_t] = μ + m s² (x_t - m μ) / (m² s² + σ²),

the score is -(x_t - m μ) / (m² s² + σ²) = -ε* / σ, and v* = m ε* - σ x_0*. Any correct sampler
driven by them must return samples with mean μ and standard deviation s. The exact reverse step
of DDPM's chain is Gaussian too: Var(x_{t-1} | x_t) = β̃_t + c_t² Var(x_0 | x_t), with c_t the
posterior's x_0 coefficient and Var(x_0 | x_t) = s² σ² / (m² s² + σ²); the oracle's learned
variance is that value, as the interpolation weight between log β̃_t and log β_t.
"""

from __future__ import annotations

import torch

from diffusion.processes.kernel import Process, per_example
from diffusion.processes.prediction import Target, make_target


class GaussianOracle(torch.nn.Module):
    """The optimal network ``raw = net(input, label)`` for data N(mean, std² I) under
    ``process`` (any family: it uses ``process.moments_at_label``), in the prediction ``target``
    (a Target or its name; it undoes the target's input scaling); with ``learn_sigma`` (DDPM
    only) it appends the exact reverse variance of DDPM's chain as Nichol & Dhariwal's
    v ∈ [-1, 1]."""

    def __init__(
        self,
        process: Process,
        mean: float,
        std: float,
        target: str | Target = "eps",
        learn_sigma: bool = False,
    ) -> None:
        super().__init__()
        self.process, self.mean, self.std = process, mean, std
        self.target, self.learn_sigma = make_target(target), learn_sigma

    def forward(self, inputs: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        m, sigma = self.process.moments_at_label(label)
        m, sigma = per_example(m, inputs), per_example(sigma, inputs)
        x_t = inputs / self.target.input_scale(m, sigma) if self.target.scales_input else inputs
        var_t = m**2 * self.std**2 + sigma**2
        eps = sigma * (x_t - m * self.mean) / var_t
        x0 = self.mean + m * self.std**2 * (x_t - m * self.mean) / var_t
        raw = self.target.value(x0, eps, m, sigma)
        if not self.learn_sigma:
            return raw
        t = label.round().long()  # DDPM: the label is the code index
        x0_var = self.std**2 * sigma**2 / var_t
        coef = per_example(self.process.posterior_coef_x0.to(x_t.device)[t], x_t)
        exact = per_example(self.process.posterior_var.to(x_t.device)[t], x_t) + coef**2 * x0_var
        low = self.process.model_log_var(t, x_t, "beta_tilde")
        high = torch.log(per_example(self.process.beta.to(x_t.device)[t], x_t))
        frac = ((torch.log(exact) - low) / (high - low)).clamp(0, 1)
        return torch.cat([raw, (2 * frac - 1).expand_as(raw)], dim=1)


class ClassGaussianOracle(torch.nn.Module):
    """The optimal class-conditional network ``raw = net(input, label, y)`` for data whose class
    c ∈ {0, …, K-1} is N(means[c], std² I) and whose unconditional model, the null class ∅
    (y = K, or y = None), is N(null_mean, null_std² I): one :class:`GaussianOracle` per class."""

    def __init__(
        self,
        process: Process,
        means: list[float],
        std: float,
        null_mean: float,
        null_std: float,
        target: str | Target = "eps",
    ) -> None:
        super().__init__()
        self.num_classes = len(means)
        self.oracles = [GaussianOracle(process, m, std, target) for m in means]
        self.oracles.append(GaussianOracle(process, null_mean, null_std, target))
        self.calls = 0  #: forward passes so far (guidance must batch both halves into one)

    def forward(
        self, inputs: torch.Tensor, label: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        self.calls += 1
        if y is None:
            y = torch.full((inputs.shape[0],), self.num_classes, dtype=torch.long)
        y = y.to(inputs.device).reshape(-1, *[1] * (inputs.ndim - 1))
        out = torch.zeros_like(inputs)
        for c, oracle in enumerate(self.oracles):
            out = torch.where(y == c, oracle(inputs, label), out)
        return out
