"""Noise-conditional score network's noise levels (Song & Ermon 2019).

σ_1 > … > σ_L in geometric progression from ``sigma_max`` to ``sigma_min`` (the paper: 1 to 0.01,
L = 10). The kernel is x = x_0 + σ ε (m = 1). As for every process, time grows with the noise:
t = 0 … L-1 indexes the levels from the smallest σ (t = L-1 is the paper's σ_1), and between
levels σ is geometric, σ(t) = σ_min (σ_max / σ_min)^{t / (L-1)}. Training perturbs x_0 by a
uniformly chosen σ_i and minimises λ(σ) ‖s_θ(x̃, σ) + (x̃ - x_0) / σ²‖² with λ = σ², which in ε
form is ‖ε̂ - z‖². The network's label for σ is the VE-SDE's, 999 log(σ / σ_min) / log(σ_max /
σ_min) = 999 t / (L - 1). NCSN offers only its ``"levels"``: its largest σ is too small for a
N(0, σ_max²) start of the chain samplers.
"""

from __future__ import annotations

import math

import torch

from diffusion.processes.kernel import LABEL_SCALE, Process


class NCSN(Process):
    """Geometric noise levels; t indexes them from the smallest (see module docstring).
    ``sigmas`` lists them in the paper's order, σ_1 > … > σ_L."""

    family = "ncsn"
    offers = frozenset({"levels"})

    def __init__(self, sigma_max: float = 1.0, sigma_min: float = 0.01, num_levels: int = 10):
        if not 0.0 < sigma_min < sigma_max or num_levels < 2:
            raise ValueError(
                f"need 0 < sigma_min < sigma_max and num_levels >= 2, got {sigma_min}, "
                f"{sigma_max}, {num_levels}"
            )
        self.sigma_min, self.sigma_max, self.num_levels = sigma_min, sigma_max, num_levels
        self.T = num_levels
        self.sigmas = torch.logspace(
            math.log10(sigma_max), math.log10(sigma_min), num_levels, dtype=torch.float64
        )
        self.prior_std = sigma_max
        self.log_ratio = math.log(sigma_max / sigma_min)

    def sigma_of(self, t: torch.Tensor) -> torch.Tensor:
        """σ(t): the levels at integer ``t`` (float32, as training uses), geometric in between
        for floating-point ``t`` (float64)."""
        if not t.is_floating_point():
            return self.sigmas.to(t.device).flip(0)[t].float()
        return self.sigma_min * torch.exp(t.double() / (self.num_levels - 1) * self.log_ratio)

    def marginal(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = self.sigma_of(t)
        return torch.ones_like(sigma), sigma

    def label(self, t: torch.Tensor) -> torch.Tensor:
        return LABEL_SCALE * torch.log(self.sigma_of(t) / self.sigma_min) / self.log_ratio

    def moments_at_label(self, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = self.sigma_min * torch.exp(label / LABEL_SCALE * self.log_ratio)
        return torch.ones_like(sigma), sigma

    def time_text(self, t: float) -> str:
        """The level's σ (t is its index from the smallest)."""
        return f"σ={float(self.sigma_of(torch.tensor([float(t)]))):.3g}"

    def sample_t(
        self, n: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """A uniformly chosen level index, shape (n,)."""
        return torch.randint(self.num_levels, (n,), device=device, generator=generator)

    def validation_times(self, k: int) -> torch.Tensor:
        """Up to k evenly spaced level indices."""
        return (
            torch.linspace(0, self.num_levels - 1, min(k, self.num_levels)).round().long().unique()
        )
