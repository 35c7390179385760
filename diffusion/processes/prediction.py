"""Prediction targets and the one adapter from a network's output to ε̂, x̂_0, score and v̂.

For any kernel x_t = m x_0 + σ ε (diffusion.processes.kernel) a network may predict

    eps:  ε                                       (Ho et al. 2020)
    x0:   x_0                                     (the data itself)
    v:    v = m ε - σ x_0                         (Salimans & Ho 2022, α_t ε - σ_t x_0 for VP)
    edm:  F of D = c_skip x̃ + c_out F(c_in x̃)     (Karras et al. 2022, Table 1; x̃ = x_t / m)

and each determines the others given x_t:

    from ε̂:  x̂_0 = (x_t - σ ε̂) / m
    from x̂_0: ε̂ = (x_t - m x̂_0) / σ
    from v̂:  x̂_0 = (m x_t - σ v̂) / (m² + σ²),   ε̂ = (σ x_t + m v̂) / (m² + σ²)
    from F̂:  x̂_0 = c_skip x̃ + c_out F̂,           ε̂ = (x̃ - x̂_0) / σ̃

(m x_t - σ v = (m² + σ²) x_0; for VP, m² + σ² = 1). The score is s = ∇ log q_t(x_t) = -ε̂ / σ
(Tweedie), and the MSE of each target is the x_0-MSE times a factor (:meth:`Target.mse_factor`):
‖ε - ε̂‖² = SNR ‖x_0 - x̂_0‖², ‖v - v̂‖² = (m² + σ²)² / σ² ‖x_0 - x̂_0‖² (SNR + 1 for VP),
‖F - F̂‖² = ‖x_0 - x̂_0‖² / c_out², so that L_simple on F is EDM's loss λ(σ) ‖D - x_0‖² with
λ = 1 / c_out² = (σ² + σ_data²) / (σ σ_data)².

Each target is one :class:`Target` object: what it asks of the network (:meth:`Target.value`),
how its output reads (:meth:`Target.eps_x0`), how its error compares with the x_0 error, and
what the network is shown (:meth:`Target.input_scale`: x_t itself, or EDM's c_in x̃).
:class:`Predictor` is the only place that applies a target: samplers, likelihoods, the FID
callback and the pictures call it and read a :class:`Prediction`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from diffusion.processes.kernel import Process, per_example

Network = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""A network ``raw = net(input, label)``: raw has the input's shape (twice its channels with a
learned variance); the input is x_t times the target's :meth:`Target.input_scale`."""


class Target(abc.ABC):
    """What a network predicts, for a kernel (m, σ) broadcast against the images."""

    name: str
    scales_input: bool = False  #: the network sees input_scale · x_t, not x_t

    def input_scale(self, m: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The factor applied to x_t before the network sees it (1 unless ``scales_input``)."""
        return torch.ones_like(m)

    @abc.abstractmethod
    def value(
        self, x0: torch.Tensor, eps: torch.Tensor, m: torch.Tensor, sigma: torch.Tensor
    ) -> torch.Tensor:
        """What the network should output for x_t = m x_0 + σ ε."""

    @abc.abstractmethod
    def eps_x0(
        self, raw: torch.Tensor, x_t: torch.Tensor, m: torch.Tensor, sigma: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(ε̂, x̂_0) from the network's output ``raw`` at x_t."""

    @abc.abstractmethod
    def mse_factor(self, m: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """c with ‖target - target̂‖² = c ‖x_0 - x̂_0‖² at fixed x_t."""


class Eps(Target):
    """ε, the noise (Ho et al. 2020): c = SNR."""

    name = "eps"

    def value(self, x0, eps, m, sigma):
        return eps

    def eps_x0(self, raw, x_t, m, sigma):
        return raw, (x_t - sigma * raw) / m

    def mse_factor(self, m, sigma):
        return (m / sigma) ** 2


class X0(Target):
    """x_0, the data: c = 1."""

    name = "x0"

    def value(self, x0, eps, m, sigma):
        return x0

    def eps_x0(self, raw, x_t, m, sigma):
        return (x_t - m * raw) / sigma, raw

    def mse_factor(self, m, sigma):
        return torch.ones_like(m)


class V(Target):
    """v = m ε - σ x_0 (Salimans & Ho 2022): c = (m² + σ²)² / σ² (SNR + 1 for VP)."""

    name = "v"

    def value(self, x0, eps, m, sigma):
        return m * eps - sigma * x0

    def eps_x0(self, raw, x_t, m, sigma):
        norm = m * m + sigma * sigma
        return (sigma * x_t + m * raw) / norm, (m * x_t - sigma * raw) / norm

    def mse_factor(self, m, sigma):
        return (m * m + sigma * sigma) ** 2 / sigma**2


class EDMPrecond(Target):
    """EDM's preconditioned denoiser (Karras et al. 2022, Table 1 and Eq. 7), written in
    x̃ = x_t / m and σ̃ = σ / m so that it serves every kernel (for EDM's own m = 1, σ̃ = σ):

        D(x̃; σ̃) = c_skip x̃ + c_out F(c_in x̃; c_noise),  c_skip = σ_d² / (σ̃² + σ_d²),
        c_out = σ̃ σ_d / √(σ̃² + σ_d²),  c_in = 1 / √(σ̃² + σ_d²),

    with σ_d = ``sigma_data``. The network is trained on F's target (x_0 - c_skip x̃) / c_out
    with unit weight, which is λ(σ̃) ‖D - x_0‖² with λ = 1 / c_out² (Eq. 8). c_noise is the
    process's label (EDM's process: ¼ ln σ).
    """

    name = "edm"
    scales_input = True

    def __init__(self, sigma_data: float = 0.5) -> None:
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.sigma_data = sigma_data

    def coefficients(self, sigma_tilde: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(c_skip, c_out, c_in) at noise level σ̃."""
        sd2 = self.sigma_data**2
        norm = sigma_tilde**2 + sd2
        return sd2 / norm, sigma_tilde * self.sigma_data / norm.sqrt(), norm.rsqrt()

    def input_scale(self, m, sigma):
        return self.coefficients(sigma / m)[2] / m  # c_in x̃ = c_in x_t / m

    def value(self, x0, eps, m, sigma):
        sigma_tilde = sigma / m
        c_skip, c_out, _ = self.coefficients(sigma_tilde)
        return (x0 - c_skip * (x0 + sigma_tilde * eps)) / c_out

    def eps_x0(self, raw, x_t, m, sigma):
        sigma_tilde, x_tilde = sigma / m, x_t / m
        c_skip, c_out, _ = self.coefficients(sigma_tilde)
        x0 = c_skip * x_tilde + c_out * raw
        return (x_tilde - x0) / sigma_tilde, x0

    def mse_factor(self, m, sigma):
        return self.coefficients(sigma / m)[1] ** -2


TARGETS: dict[str, Target] = {t.name: t for t in (Eps(), X0(), V(), EDMPrecond())}
"""The targets by name, ``module.prediction=<name>`` (EDM's with σ_data = 0.5)."""


def make_target(name: str | Target, sigma_data: float | None = None) -> Target:
    """The target of this name (``sigma_data`` for ``edm``); a Target is returned as it is."""
    if isinstance(name, Target):
        return name
    if name not in TARGETS:
        raise ValueError(f"prediction must be one of {list(TARGETS)}, got {name!r}")
    if name == "edm" and sigma_data is not None:
        return EDMPrecond(sigma_data)
    return TARGETS[name]


def check_target(target: str | Target) -> Target:
    return make_target(target)


def target_value(
    target: str | Target, x0: torch.Tensor, eps: torch.Tensor, m: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """What a network of this ``target`` should output for x_t = m x_0 + σ ε (m, σ broadcast)."""
    return make_target(target).value(x0, eps, m, sigma)


def eps_x0_from(
    target: str | Target, raw: torch.Tensor, x_t: torch.Tensor, m: torch.Tensor, sigma: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ε̂, x̂_0) from a network output ``raw`` of this ``target`` at x_t (module docstring)."""
    return make_target(target).eps_x0(raw, x_t, m, sigma)


def mse_factor(target: str | Target, m: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """c with ‖target - target̂‖² = c ‖x_0 - x̂_0‖² at fixed x_t: SNR for ε, 1 for x_0,
    (m² + σ²)² / σ² for v (SNR + 1 for VP), 1 / c_out² for EDM's F."""
    return make_target(target).mse_factor(m, sigma)


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
        net: ``raw = net(input, label)``.
        process: the kernel and the label (diffusion.processes.kernel.Process).
        target: a :class:`Target` or its name, ``eps``, ``x0``, ``v`` or ``edm``.
        learn_sigma: the network outputs twice the channels; the second half is the variance
            interpolation v ∈ [-1, 1] of Nichol & Dhariwal 2021.
    """

    def __init__(
        self,
        net: Network,
        process: Process,
        target: str | Target = "eps",
        learn_sigma: bool = False,
    ) -> None:
        self.net, self.process = net, process
        self.target, self.learn_sigma = make_target(target), learn_sigma

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> Prediction:
        m, sigma = self.process.marginal(t)
        m, sigma = per_example(m, x_t), per_example(sigma, x_t)
        raw = self.net(network_input(self.target, x_t, m, sigma), self.process.label(t))
        var_frac = None
        if self.learn_sigma:
            raw, v = raw.chunk(2, dim=1)
            var_frac = (v + 1) / 2
        eps_hat, x0_hat = self.target.eps_x0(raw, x_t, m, sigma)
        return Prediction(x_t, m, sigma, eps_hat, x0_hat, var_frac)


def network_input(
    target: Target, x_t: torch.Tensor, m: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """What the network is shown at x_t: x_t itself, or the target's scaling of it (EDM)."""
    return target.input_scale(m, sigma) * x_t if target.scales_input else x_t
