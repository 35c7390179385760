"""The one view of every family: a Gaussian perturbation kernel and what a process offers.

Every process of this package (DDPM at its code indices, the VP / sub-VP / VE SDEs in continuous
time, EDM at its noise levels σ, NCSN at its discrete levels) perturbs the data as

    x_t = m(t) x_0 + σ(t) ε,    ε ~ N(0, I)                          (the kernel q(x_t | x_0))

and shows the network x_t with a time **label** c(t) (:meth:`Process.label`). That is all a
loss, a prediction target or a sampler needs. In k-diffusion's and EDM's variables, x̃ = x / m
is the data plus noise of level σ̃ = σ / m, so the families differ only by how (m, σ) move with
t; the chain samplers below are written in (m, σ) and are valid for every kernel.

A process declares what it offers in ``offers`` (samplers declare what they need, see
:mod:`diffusion.samplers`; no code dispatches on class names):

- ``"chain"``: T times t_0 < … < t_{T-1} (:meth:`chain_times`) whose kernels the chain samplers
  (ancestral, DDIM, DPM-Solver++) visit from t_{T-1} down to the data, and x_{T-1} ≈ N(0,
  ``prior_std``² I). DDPM's are its code indices; an SDE's are T = ``N`` evenly spaced times.
- ``"sde"``: continuous time in [``t_min``, ``t_max``] with the forward SDE
  dx = f(t) x dt + g(t) dw (:meth:`coefficients`), for the SDE samplers and the ODE likelihood,
  and the inverse of σ̃(t) (:meth:`~SDEView.time_at`), for the samplers written in σ̃ (EDM's).
- ``"levels"``: NCSN's noise levels (m = 1), for annealed Langevin dynamics.
- ``"vlb"``: a discrete variational bound (DDPM's): ``loss_weight=vlb``, learned variances and
  bits/dim from the bound.

Conventions. t is the process's own time: DDPM's code index (counting from 0, fractional in
between, see diffusion.processes.ddpm), the SDE time in [t_min, 1], NCSN's level index (from
the smallest σ): in every family σ / m grows with t. :meth:`marginal` maps a tensor of times
(B,) to (m, σ) of the same shape; floating-point times give float64. Image tensors are
(B, C, H, W) or any (B, ...).
"""

from __future__ import annotations

import abc
import math

import torch

LABEL_SCALE = 999.0
"""Network time input of the continuous families: label = 999·t, the range of DDPM's indices."""


def per_example(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) on ``like``'s device and in its dtype, to broadcast over images."""
    return v.to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def batch_of(t: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A time (a float, or a 0-d tensor) repeated for every example of ``like``: (B,) float64."""
    return torch.full((like.shape[0],), float(t), device=like.device, dtype=torch.float64)


class Process(abc.ABC):
    """A Gaussian perturbation kernel x_t = m(t) x_0 + σ(t) ε with a network time label.

    Subclasses set ``family``, ``offers`` (module docstring), ``T`` (the number of chain times) and
    ``prior_std``, and implement :meth:`marginal`, :meth:`label`, :meth:`moments_at_label`,
    :meth:`sample_t` and :meth:`validation_times`; the chain and SDE views have defaults
    written in terms of the kernel.
    """

    family: str  #: the name of its config, conf/process/<family>.yaml
    offers: frozenset[str] = frozenset()
    T: int
    prior_std: float = 1.0

    @abc.abstractmethod
    def marginal(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(m(t), σ(t)) of q(x_t | x_0) = N(m x_0, σ² I), each shaped like ``t``."""

    @abc.abstractmethod
    def label(self, t: torch.Tensor) -> torch.Tensor:
        """The network's time input at times ``t`` (B,)."""

    @abc.abstractmethod
    def moments_at_label(self, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(m, σ) at the time a network input ``label`` stands for (the inverse of label)."""

    @abc.abstractmethod
    def sample_t(
        self, n: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Training times, shape (n,), from the family's own distribution."""

    @abc.abstractmethod
    def validation_times(self, k: int) -> torch.Tensor:
        """Up to k fixed times spread over the family's range, for a comparable validation loss."""

    def time_text(self, t: float) -> str:
        """How pictures label time t (a denoising strip's columns): the family's own time."""
        return f"t={t:.3g}"

    # ----- derived quantities -------------------------------------------------------------
    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio m² / σ² (Kingma et al. 2021); ᾱ / (1 - ᾱ) for DDPM."""
        m, sigma = self.marginal(t)
        return (m / sigma) ** 2

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        """λ(t) = log(m / σ), half the log-SNR (DPM-Solver's λ)."""
        m, sigma = self.marginal(t)
        return torch.log(m) - torch.log(sigma)

    # ----- the "chain" view ---------------------------------------------------------------
    def chain_times(self) -> torch.Tensor:
        """The T chain times, increasing (index 0 is the least noisy), float64."""
        return torch.arange(self.T, dtype=torch.float64)


class SDEView(abc.ABC):
    """The ``"sde"`` view of a process: dx = f(t) x dt + g(t) dw on [t_min, t_max], whose
    marginals are the process's kernel (f = d log m / dt, g² = dσ²/dt - 2 f σ²)."""

    t_min: float  #: smallest time (where sampling stops and the ODE likelihood starts)
    t_max: float  #: largest time (where sampling starts)

    @abc.abstractmethod
    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f(t), g(t)) of dx = f(t) x dt + g(t) dw, each shaped like ``t``."""

    def reverse_drift(
        self, x: torch.Tensor, t: torch.Tensor, score: torch.Tensor, probability_flow: bool = False
    ) -> torch.Tensor:
        """f(t) x - g(t)² s of the reverse SDE (Song et al. 2021, Eq. 6), or f(t) x - ½ g(t)² s
        of the probability-flow ODE (Eq. 13) with ``probability_flow``."""
        f, g = self.coefficients(t)
        weight = 0.5 if probability_flow else 1.0
        return per_example(f, x) * x - weight * per_example(g, x) ** 2 * score

    def sigma_tilde(self, t: torch.Tensor) -> torch.Tensor:
        """σ̃(t) = σ(t) / m(t), the noise level of x̃ = x / m (k-diffusion's and EDM's sigma)."""
        m, sigma = self.marginal(t)
        return sigma / m

    def time_at(self, sigma_tilde: torch.Tensor) -> torch.Tensor:
        """The time t ∈ [t_min, t_max] with σ̃(t) = ``sigma_tilde`` (clamped to that range),
        float64: the inverse of :meth:`sigma_tilde`, by bisection on the increasing σ̃(t) to
        float64 precision; families with a closed form override it."""
        target = sigma_tilde.double()
        lo = torch.full_like(target, float(self.t_min))
        hi = torch.full_like(target, float(self.t_max))
        for _ in range(64):  # the bracket halves each time: 2⁻⁶⁴ of the range at the end
            mid = 0.5 * (lo + hi)
            below = self.sigma_tilde(mid) < target
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return 0.5 * (lo + hi)

    def discretize(self, t: torch.Tensor, dt: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward step that arrives at t from t - dt, x_t = a x_{t-dt} + G z: (a, G), each
        shaped like ``t``. Euler–Maruyama by default (a = 1 + f dt, G = g √dt); families with a
        chain of their own (DDPM's, VP's, VE's) override it, as the reverse-diffusion predictor
        of Song et al. 2021 expects."""
        f, g = self.coefficients(t)
        return 1.0 + f * dt, g * math.sqrt(dt)
