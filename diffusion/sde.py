"""Score-based families: score SDEs (Song et al. 2021) and NCSN's noise levels (Song & Ermon 2019).

Every process here has a Gaussian perturbation kernel and a linear drift,

    q(x_t | x_0) = N(m(t) x_0, σ(t)² I),    dx = f(t) x dt + g(t) dw,    t ∈ [ε, 1],

and the network predicts ε as in DDPM. Its time input is the **label** 999·t (for NCSN, the
same function of σ as in the VE-SDE), so one U-Net and its embedding serve every family; a DDPM
network runs with the VP-SDE samplers and a VP-SDE network with DDPM's (diffusion.families).
The score follows from ε̂: s(x, t) = ∇ log q_t(x) = -ε̂(x, t) / σ(t).

Training is denoising score matching (Song et al. 2021, Eq. 7) with λ(t) = σ(t)²; in ε form
λ ‖s_θ + z / σ‖² = ‖ε̂ - z‖², DDPM's L_simple. ``weighting="likelihood"`` uses λ = g(t)² (Song,
Durkan et al. 2021), i.e. ‖ε̂ - z‖² · g(t)² / σ(t)².
"""

from __future__ import annotations

import abc
import math

import torch

from diffusion.process import EpsModel

LABEL_SCALE = 999.0  # network time input = 999·t, the range of DDPM's integer t


def per_example(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) in ``like``'s dtype, to broadcast over images."""
    return v.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


class SDE(abc.ABC):
    """A forward SDE with linear drift and Gaussian marginals (see module docstring).

    ``eps``: the smallest time, where sampling stops and training starts (σ(0) may be 0).
    ``prior_std``: x(1) ≈ N(0, prior_std² I), the reverse process's start.
    """

    eps: float
    prior_std: float = 1.0
    weighting: str = "sde"

    def _set_weighting(self, weighting: str) -> None:
        if weighting not in ("sde", "likelihood"):
            raise ValueError(f"weighting must be 'sde' or 'likelihood', got {weighting!r}")
        self.weighting = weighting

    @abc.abstractmethod
    def marginal(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(m(t), σ(t)) of q(x_t | x_0) = N(m x_0, σ² I); shapes of ``t``."""

    @abc.abstractmethod
    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f(t), g(t)) of dx = f(t) x dt + g(t) dw; shapes of ``t``."""

    def label(self, t: torch.Tensor) -> torch.Tensor:
        return LABEL_SCALE * t

    def reverse_drift(
        self, x: torch.Tensor, t: torch.Tensor, score: torch.Tensor, probability_flow: bool = False
    ) -> torch.Tensor:
        """f(t) x - g(t)² s of the reverse SDE (Song et al. 2021, Eq. 6), or f(t) x - ½ g(t)² s
        of the probability-flow ODE (Eq. 13) with ``probability_flow``."""
        f, g = self.coefficients(t)
        weight = 0.5 if probability_flow else 1.0
        return per_example(f, x) * x - weight * per_example(g, x) ** 2 * score

    def moments_at_label(self, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(m, σ) at the time a network input ``label`` stands for."""
        return self.marginal(label / LABEL_SCALE)

    def sample_t(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """t ~ U[ε, 1], shape (n,)."""
        return self.eps + (1.0 - self.eps) * torch.rand(n, device=device)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        m, sigma = self.marginal(t)
        return per_example(m, x0) * x0 + per_example(sigma, x0) * noise

    def score(self, model: EpsModel, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """s_θ(x, t) = -ε̂(x, t) / σ(t) for a batch ``x`` at times ``t`` (B,)."""
        _, sigma = self.marginal(t)
        return -model(x, self.label(t)) / per_example(sigma, x)

    def discretize(
        self, x: torch.Tensor, t: torch.Tensor, dt: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward step that arrives at t from t - dt, as x + f_i + G_i z: (f_i, G_i).
        Euler–Maruyama by default (f_i = f(t) x dt, G_i = g(t) √dt); the VP and VE SDEs use
        their own chains (DDPM's and NCSN's), as the reverse-diffusion predictor expects."""
        f, g = self.coefficients(t)
        return per_example(f, x) * x * dt, per_example(g, x) * math.sqrt(dt)

    def loss(
        self,
        model: EpsModel,
        x0: torch.Tensor,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Denoising score matching per example, shape (B,), with this SDE's ``weighting``
        (module docstring); ``t`` defaults to U[ε, 1], ``noise`` to N(0, I)."""
        t = self.sample_t(x0.shape[0], x0.device) if t is None else t
        noise = torch.randn_like(x0) if noise is None else noise
        eps_hat = model(self.q_sample(x0, t, noise), self.label(t))
        loss = (eps_hat - noise).pow(2).flatten(1).mean(1)
        if self.weighting == "likelihood":
            _, g = self.coefficients(t)
            _, sigma = self.marginal(t)
            loss = loss * (g / sigma).pow(2).to(loss.dtype)
        return loss

    def validation_times(self, k: int) -> torch.Tensor:
        """k evenly spaced times in [ε, 1] for a comparable validation loss."""
        return torch.linspace(self.eps, 1.0, k)


class VPSDE(SDE):
    """Variance preserving: dx = -½ β(t) x dt + √β(t) dw, β(t) = β_min + t (β_max - β_min).

    m(t) = exp(-½ B(t)), σ(t)² = 1 - exp(-B(t)), B(t) = ∫₀ᵗ β = β_min t + ½ (β_max - β_min) t².
    Its N-step chain x_i = √(1 - β_i) x_{i-1} + √β_i z with β_i = β(i / (N - 1)) / N is DDPM:
    at N = 1000 the linear schedule from 1e-4 to 0.02 (:meth:`discrete_beta`).
    """

    def __init__(
        self,
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        eps: float = 1e-3,
        weighting: str = "sde",
    ) -> None:
        if not 0.0 < beta_min <= beta_max:
            raise ValueError(f"need 0 < beta_min <= beta_max, got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max, self.eps = beta_min, beta_max, eps
        self._set_weighting(weighting)

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

    def discrete_beta(self, n: int) -> torch.Tensor:
        """β_i = β(i / (n - 1)) / n, i = 0 … n-1 (float64)."""
        i = torch.arange(n, dtype=torch.float64)
        return (self.beta_min + (self.beta_max - self.beta_min) * i / (n - 1)) / n

    def discretize(self, x, t, dt):
        beta = per_example(self.beta(t) * dt, x)  # β_i of the chain with step dt = 1/N
        return ((1.0 - beta).sqrt() - 1.0) * x, beta.sqrt()


class SubVPSDE(VPSDE):
    """sub-VP: dx = -½ β(t) x dt + √(β(t) (1 - e^{-2B(t)})) dw; m(t) as VP, σ(t) = 1 - e^{-B(t)}
    (a variance below VP's at every t; Song et al. 2021, Eq. 31)."""

    def marginal(self, t):
        b = self.integral(t)
        return torch.exp(-0.5 * b), -torch.expm1(-b)

    def coefficients(self, t):
        beta = self.beta(t)
        return -0.5 * beta, (beta * -torch.expm1(-2.0 * self.integral(t))).sqrt()

    discretize = SDE.discretize


class VESDE(SDE):
    """Variance exploding: dx = σ(t) √(2 log(σ_max / σ_min)) dw, σ(t) = σ_min (σ_max / σ_min)^t.

    m = 1 and the kernel's std is σ(t) (so x(0) is the data perturbed by σ_min, as in the
    paper); the prior is N(0, σ_max² I). Its N-step chain adds √(σ_i² - σ_{i-1}²) z, NCSN's.
    """

    def __init__(
        self,
        sigma_min: float = 0.01,
        sigma_max: float = 50.0,
        eps: float = 1e-5,
        weighting: str = "sde",
    ) -> None:
        if not 0.0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max, self.eps = sigma_min, sigma_max, eps
        self._set_weighting(weighting)
        self.prior_std = sigma_max
        self.log_ratio = math.log(sigma_max / sigma_min)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma_min * torch.exp(t * self.log_ratio)

    def marginal(self, t):
        return torch.ones_like(t), self.sigma(t)

    def coefficients(self, t):
        return torch.zeros_like(t), self.sigma(t) * math.sqrt(2.0 * self.log_ratio)

    def discretize(self, x, t, dt):
        sigma, sigma_prev = self.sigma(t), self.sigma(t - dt)
        return torch.zeros_like(x), per_example((sigma**2 - sigma_prev**2).sqrt(), x)


class NCSN:
    """Noise-conditional score network's noise levels (Song & Ermon 2019).

    σ_1 > … > σ_L in geometric progression from ``sigma_max`` to ``sigma_min`` (the paper: 1 to
    0.01, L = 10); training perturbs x_0 by a uniformly chosen σ_i and minimises
    λ(σ) ‖s_θ(x̃, σ) + (x̃ - x_0) / σ²‖² with λ = σ², which in ε form is ‖ε̂ - z‖². The network's
    label for σ is the VE-SDE's: 999 log(σ / σ_min) / log(σ_max / σ_min).
    """

    def __init__(self, sigma_max: float = 1.0, sigma_min: float = 0.01, num_levels: int = 10):
        if not 0.0 < sigma_min < sigma_max or num_levels < 2:
            raise ValueError(
                f"need 0 < sigma_min < sigma_max and num_levels >= 2, got {sigma_min}, "
                f"{sigma_max}, {num_levels}"
            )
        self.sigma_min, self.sigma_max, self.num_levels = sigma_min, sigma_max, num_levels
        self.sigmas = torch.logspace(
            math.log10(sigma_max), math.log10(sigma_min), num_levels, dtype=torch.float64
        )
        self.prior_std = sigma_max
        self.log_ratio = math.log(sigma_max / sigma_min)

    def label(self, sigma: torch.Tensor) -> torch.Tensor:
        return LABEL_SCALE * torch.log(sigma / self.sigma_min) / self.log_ratio

    def moments_at_label(self, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = self.sigma_min * torch.exp(label / LABEL_SCALE * self.log_ratio)
        return torch.ones_like(sigma), sigma

    def score(self, model: EpsModel, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """s_θ(x, σ) = -ε̂(x, σ) / σ for a batch at levels ``sigma`` (B,)."""
        return -model(x, self.label(sigma)) / per_example(sigma, x)

    def loss(
        self,
        model: EpsModel,
        x0: torch.Tensor,
        level: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Denoising score matching with λ(σ) = σ², per example (B,); ``level`` indexes σ."""
        if level is None:
            level = torch.randint(self.num_levels, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0) if noise is None else noise
        sigma = self.sigmas.to(x0.device)[level].to(x0.dtype)
        eps_hat = model(x0 + per_example(sigma, x0) * noise, self.label(sigma))
        return (eps_hat - noise).pow(2).flatten(1).mean(1)

    def validation_times(self, k: int) -> torch.Tensor:
        """Up to k evenly spaced level indices."""
        return (
            torch.linspace(0, self.num_levels - 1, min(k, self.num_levels)).round().long().unique()
        )
