"""EDM's process (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models"): the data plus Gaussian noise of level σ, with σ itself as the time.

    x = x_0 + σ ε,   m = 1,   t = σ ∈ [σ_min, σ_max]                         (Table 1, "EDM")

Training draws ln σ ~ N(P_mean, P_std²) (Sec. 5, "Loss weighting and sampling"); the network's
time label is c_noise(σ) = ¼ ln σ. The preconditioning c_skip, c_out, c_in and the weight λ(σ)
belong to the prediction target ``edm`` (diffusion.processes.prediction), which
conf/process/edm.yaml selects with this process. Its SDE view is dx = √(2σ) dw in t = σ
(f = 0, g² = dσ²/dt), whose probability-flow ODE dx/dσ = -σ s(x; σ) = (x - D(x; σ)) / σ is
EDM's Eq. 3; the prior is N(0, σ_max² I). For the chain samplers it offers N chain times spaced
evenly in ln σ.
"""

from __future__ import annotations

import math

import torch

from diffusion.processes.kernel import Process, SDEView


class EDM(Process, SDEView):
    """x = x_0 + σ ε at times t = σ (module docstring).

    Args:
        sigma_min, sigma_max: the range of σ (0.002 and 80 in the paper).
        P_mean, P_std: the training distribution ln σ ~ N(P_mean, P_std²) (-1.2, 1.2).
        N: the number of chain times, geometric from σ_min to σ_max.
    """

    family = "edm"
    offers = frozenset({"chain", "sde"})

    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        P_mean: float = -1.2,
        P_std: float = 1.2,
        N: int = 1000,
    ) -> None:
        if not 0.0 < sigma_min < sigma_max:
            raise ValueError(
                f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}"
            )
        if not P_std > 0:
            raise ValueError(f"P_std must be > 0, got {P_std}")
        if not isinstance(N, int) or N < 2:
            raise ValueError(f"N (chain times) must be an integer >= 2, got {N!r}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.t_min, self.t_max = self.sigma_min, self.sigma_max
        self.P_mean, self.P_std, self.T = float(P_mean), float(P_std), N
        self.prior_std = self.sigma_max

    # ----- the kernel and the label ----------------------------------------------------------
    def marginal(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, σ) with σ = t."""
        return torch.ones_like(t), t

    def label(self, t: torch.Tensor) -> torch.Tensor:
        """c_noise(σ) = ¼ ln σ (Table 1)."""
        return 0.25 * torch.log(t)

    def moments_at_label(self, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ones_like(label), torch.exp(4.0 * label)

    def time_text(self, t: float) -> str:
        return f"σ={t:.3g}"

    def sample_t(
        self, n: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """σ = exp(P_mean + P_std n), n ~ N(0, 1), shape (n,)."""
        normal = torch.randn(n, device=device, generator=generator)
        return torch.exp(self.P_mean + self.P_std * normal)

    def validation_times(self, k: int) -> torch.Tensor:
        """k σ's at the quantiles (i + ½) / k of the training distribution, so the validation
        loss weighs noise levels as training does."""
        q = (torch.arange(k, dtype=torch.float64) + 0.5) / k
        normal = math.sqrt(2.0) * torch.erfinv(2.0 * q - 1.0)
        return torch.exp(self.P_mean + self.P_std * normal).float()

    def chain_times(self) -> torch.Tensor:
        """N σ's, evenly spaced in ln σ from σ_min to σ_max (increasing)."""
        return torch.exp(
            torch.linspace(math.log(self.sigma_min), math.log(self.sigma_max), self.T,
                           dtype=torch.float64)
        )  # fmt: skip

    # ----- the "sde" view --------------------------------------------------------------------
    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f = 0, g = √(2σ): dσ²/dt = 2σ at t = σ."""
        return torch.zeros_like(t), (2.0 * t).sqrt()

    def discretize(self, t: torch.Tensor, dt: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact step from σ - dt to σ: a = 1, G² = σ² - (σ - dt)²."""
        return torch.ones_like(t), (t**2 - (t - dt).clamp(min=0) ** 2).sqrt()

    def time_at(self, sigma_tilde: torch.Tensor) -> torch.Tensor:
        """t = σ̃ (m = 1), not clamped: the network takes any σ."""
        return sigma_tilde.double()
