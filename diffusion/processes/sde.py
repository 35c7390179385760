"""Score SDEs (Song et al. 2021): variance preserving, sub-VP and variance exploding.

Each has a linear drift and a Gaussian kernel (diffusion.processes.kernel),

    q(x_t | x_0) = N(m(t) x_0, σ(t)² I),    dx = f(t) x dt + g(t) dw,    t ∈ [t_min, 1],

and the network's time input is the label 999·t. Besides the SDE view, each offers a chain of
N evenly spaced times in [t_min, 1] (the chain samplers' grid; N = 1000, the paper's number of
discretization steps), and its own forward step between them for the reverse-diffusion
predictor (VP: DDPM's step, VE: NCSN's; sub-VP: Euler–Maruyama).

Training is denoising score matching (Song et al. 2021, Eq. 7); with λ(t) = σ(t)² it is DDPM's
L_simple in ε form, and ``loss_weight=likelihood`` gives λ = g(t)² (diffusion.training.weighting).
"""

from __future__ import annotations

import math

import torch

from diffusion.processes.kernel import LABEL_SCALE, Process, SDEView

WEIGHTINGS = ("sde", "likelihood")


class SDE(Process, SDEView):
    """A score SDE's time handling; subclasses give the kernel and the coefficients.

    Args (common): ``t_min``, the smallest time (where sampling stops and training starts; σ(0)
    may be 0); ``N``, the number of chain times; ``weighting``, kept so that checkpoints from
    before ``loss_weight=`` load: ``likelihood`` there means ``loss_weight=likelihood``.
    """

    offers = frozenset({"chain", "sde"})
    t_max = 1.0

    def __init__(self, t_min: float, N: int, weighting: str) -> None:
        if not 0.0 < t_min < 1.0:
            raise ValueError(f"t_min must be in (0, 1), got {t_min}")
        if not isinstance(N, int) or N < 2:
            raise ValueError(f"N (chain times) must be an integer >= 2, got {N!r}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {list(WEIGHTINGS)}, got {weighting!r}")
        self.t_min, self.T, self.weighting = t_min, N, weighting

    def label(self, t: torch.Tensor) -> torch.Tensor:
        return LABEL_SCALE * t

    def moments_at_label(self, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.marginal(label / LABEL_SCALE)

    def chain_times(self) -> torch.Tensor:
        """t_k = t_min + (1 - t_min) k / (N - 1), k = 0 … N-1."""
        return torch.linspace(self.t_min, 1.0, self.T, dtype=torch.float64)

    def sample_t(
        self, n: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """t ~ U[t_min, 1], shape (n,)."""
        return self.t_min + (1.0 - self.t_min) * torch.rand(n, device=device, generator=generator)

    def validation_times(self, k: int) -> torch.Tensor:
        """k evenly spaced times in [t_min, 1]."""
        return torch.linspace(self.t_min, 1.0, k)


class VPSDE(SDE):
    """Variance preserving: dx = -½ β(t) x dt + √β(t) dw, β(t) = β_min + t (β_max - β_min).

    m(t) = exp(-½ B(t)), σ(t)² = 1 - exp(-B(t)), B(t) = ∫₀ᵗ β = β_min t + ½ (β_max - β_min) t².
    Its N-step chain x_i = √(1 - β_i) x_{i-1} + √β_i z with β_i = β(i / (N - 1)) / N is DDPM:
    at N = 1000 the linear schedule from 1e-4 to 0.02 (:meth:`discrete_beta`).
    """

    family = "vp_sde"

    def __init__(
        self,
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        t_min: float = 1e-3,
        N: int = 1000,
        weighting: str = "sde",
    ) -> None:
        if not 0.0 < beta_min <= beta_max:
            raise ValueError(f"need 0 < beta_min <= beta_max, got {beta_min}, {beta_max}")
        super().__init__(t_min, N, weighting)
        self.beta_min, self.beta_max = beta_min, beta_max

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def integral(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def marginal(self, t):
        b = self.integral(t)
        return torch.exp(-0.5 * b), (-torch.expm1(-b)).sqrt()

    def coefficients(self, t):
        beta = self.beta(t)
        return -0.5 * beta, beta.sqrt()

    def time_of(self, alpha_bar: torch.Tensor) -> torch.Tensor:
        """The t with m(t)² = ᾱ, i.e. B(t) = -log ᾱ (the positive root of the quadratic)."""
        a, b = 0.5 * (self.beta_max - self.beta_min), self.beta_min
        integral = -torch.log(alpha_bar)
        if a == 0:
            return integral / b
        return (-b + (b * b + 4 * a * integral).sqrt()) / (2 * a)

    def time_at(self, sigma_tilde: torch.Tensor) -> torch.Tensor:
        """The t with σ̃(t) = σ̃: m² = ᾱ = 1 / (1 + σ̃²), clamped to [t_min, 1]."""
        alpha_bar = 1.0 / (1.0 + sigma_tilde.double() ** 2)
        return self.time_of(alpha_bar).clamp(self.t_min, self.t_max)

    def discrete_beta(self, n: int) -> torch.Tensor:
        """β_i = β(i / (n - 1)) / n, i = 0 … n-1 (float64)."""
        i = torch.arange(n, dtype=torch.float64)
        return (self.beta_min + (self.beta_max - self.beta_min) * i / (n - 1)) / n

    def discretize(self, t, dt):
        beta = self.beta(t) * dt  # β_i of the chain with step dt = 1/N
        return (1.0 - beta).sqrt(), beta.sqrt()


class SubVPSDE(VPSDE):
    """sub-VP: dx = -½ β(t) x dt + √(β(t) (1 - e^{-2B(t)})) dw; m(t) as VP, σ(t) = 1 - e^{-B(t)}
    (a variance below VP's at every t; Song et al. 2021, Eq. 31)."""

    family = "subvp_sde"

    def marginal(self, t):
        b = self.integral(t)
        return torch.exp(-0.5 * b), -torch.expm1(-b)

    def coefficients(self, t):
        beta = self.beta(t)
        return -0.5 * beta, (beta * -torch.expm1(-2.0 * self.integral(t))).sqrt()

    discretize = SDEView.discretize
    time_at = SDEView.time_at  # σ̃ = (1 - e^{-B}) / e^{-B/2}: by bisection


class VESDE(SDE):
    """Variance exploding: dx = σ(t) √(2 log(σ_max / σ_min)) dw, σ(t) = σ_min (σ_max / σ_min)^t.

    m = 1 and the kernel's std is σ(t) (so x(0) is the data perturbed by σ_min, as in the
    paper); the prior is N(0, σ_max² I). Its N-step chain adds √(σ_i² - σ_{i-1}²) z, NCSN's.
    """

    family = "ve_sde"

    def __init__(
        self,
        sigma_min: float = 0.01,
        sigma_max: float = 50.0,
        t_min: float = 1e-5,
        N: int = 1000,
        weighting: str = "sde",
    ) -> None:
        if not 0.0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        super().__init__(t_min, N, weighting)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.prior_std = sigma_max
        self.log_ratio = math.log(sigma_max / sigma_min)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma_min * torch.exp(t * self.log_ratio)

    def marginal(self, t):
        return torch.ones_like(t), self.sigma(t)

    def time_at(self, sigma_tilde: torch.Tensor) -> torch.Tensor:
        """t = log(σ / σ_min) / log(σ_max / σ_min), clamped to [t_min, 1]."""
        t = torch.log(sigma_tilde.double() / self.sigma_min) / self.log_ratio
        return t.clamp(self.t_min, self.t_max)

    def coefficients(self, t):
        return torch.zeros_like(t), self.sigma(t) * math.sqrt(2.0 * self.log_ratio)

    def discretize(self, t, dt):
        sigma, sigma_prev = self.sigma(t), self.sigma(t - dt)
        return torch.ones_like(t), (sigma**2 - sigma_prev**2).sqrt()
