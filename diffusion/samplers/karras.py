"""EDM's samplers (Karras et al. 2022, Algorithms 1 and 2) on Karras' σ steps, for every process
with an SDE view (diffusion.processes.kernel).

In x̃ = x / m and σ̃ = σ / m every kernel is the data plus Gaussian noise of level σ̃, and the
probability-flow ODE is the same for every family (EDM Eq. 3 with σ(t) = t, s(t) = 1):

    dx̃ / dσ̃ = (x̃ - D(x̃; σ̃)) / σ̃ = ε̂,

so a sampler written in σ̃ needs from a process only the time t with σ̃(t) = σ̃
(:meth:`~diffusion.processes.kernel.SDEView.time_at`), where the network sees x_t = m(t) x̃.
This is how EDM samples pre-trained VP and VE models; here it samples DDPM, the score SDEs and
EDM's own models. NCSN's discrete levels have no ODE and are refused.

The steps (Eq. 5) run from σ_max to σ_min and then to 0:

    σ_i = (σ_max^{1/ρ} + i / (N - 1) · (σ_min^{1/ρ} - σ_max^{1/ρ}))^ρ,  i < N,   σ_N = 0,

with ρ = 7 and, by default, the process's own range σ̃(t_min) … σ̃(t_max).
"""

from __future__ import annotations

import math

import torch

from diffusion.processes.kernel import Process, batch_of
from diffusion.processes.prediction import Prediction, Predictor
from diffusion.samplers.base import Callback, Step, needs, noise


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """σ_0 = σ_max > … > σ_{N-1} = σ_min of Eq. 5 (without the final 0); N = ``steps``."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(
            f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}"
        )
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    if steps == 1:
        return [float(sigma_max)]
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return [(hi + i / (steps - 1) * (lo - hi)) ** rho for i in range(steps)]


def sigma_range(
    process: Process, sigma_min: float | None, sigma_max: float | None
) -> tuple[float, float]:
    """(σ_min, σ_max) for the steps: the process's σ̃(t_min) and σ̃(t_max) where not given; a
    ValueError for a range the process does not cover."""
    ends = process.sigma_tilde(torch.tensor([process.t_min, process.t_max], dtype=torch.float64))
    low, high = float(ends[0]), float(ends[1])
    sigma_min = low if sigma_min is None else float(sigma_min)
    sigma_max = high if sigma_max is None else float(sigma_max)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(
            f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}"
        )
    slack = 1e-6
    if sigma_min < low * (1 - slack) or sigma_max > high * (1 + slack):
        raise ValueError(
            f"sigma_min={sigma_min:g} and sigma_max={sigma_max:g} must lie in the process's range "
            f"[{low:g}, {high:g}] (sigma / m at t_min and t_max); null takes its ends"
        )
    return sigma_min, sigma_max


def _denoise(
    model: Predictor, process: Process, x_tilde: torch.Tensor, sigma_tilde: float
) -> tuple[Prediction, float, float]:
    """The model at x̃ of level σ̃: its Prediction (ε̂ = (x̃ - D) / σ̃), the time t and m(t)."""
    t = float(process.time_at(torch.tensor([sigma_tilde], dtype=torch.float64)))
    m = float(process.marginal(torch.tensor([t], dtype=torch.float64))[0])
    return model(m * x_tilde, batch_of(t, x_tilde)), t, m


def _m_at(process: Process, sigma_tilde: float) -> float:
    if sigma_tilde == 0:
        return 1.0  # the data
    t = process.time_at(torch.tensor([sigma_tilde], dtype=torch.float64))
    return float(process.marginal(t)[0])


def _karras(
    model: Predictor,
    x_T: torch.Tensor,
    process: Process,
    second_order: bool,
    steps: int,
    sigma_min: float | None,
    sigma_max: float | None,
    rho: float,
    S_churn: float,
    S_tmin: float,
    S_tmax: float,
    S_noise: float,
    generator: torch.Generator | None,
    callback: Callback | None,
) -> torch.Tensor:
    """EDM's Algorithm 2 (``second_order``) or its Euler variant; returns x_0 (σ = 0, m = 1)."""
    if S_churn < 0:
        raise ValueError(f"S_churn must be >= 0, got {S_churn}")
    if S_noise < 0:
        raise ValueError(f"S_noise must be >= 0, got {S_noise}")
    low, high = sigma_range(process, sigma_min, sigma_max)
    sigmas = [*karras_sigmas(steps, low, high, rho), 0.0]
    top = float(process.sigma_tilde(torch.tensor([process.t_max], dtype=torch.float64)))
    x = x_T * sigmas[0]  # x̃_0 ~ N(0, σ_0² I)
    nfe = 0
    for i in range(steps):
        s_cur, s_next = sigmas[i], sigmas[i + 1]
        gamma = min(S_churn / steps, math.sqrt(2) - 1) if S_tmin <= s_cur <= S_tmax else 0.0
        s_hat = min(s_cur * (1 + gamma), max(top, s_cur))  # no level above the process's own
        if s_hat > s_cur:  # churn: raise the noise level to σ̂ (lines 5-6)
            x = x + math.sqrt(s_hat**2 - s_cur**2) * S_noise * noise(x, generator)
        pred, t_hat, m_hat = _denoise(model, process, x, s_hat)
        nfe += 1
        d = pred.eps_hat  # (x̂ - D(x̂; σ̂)) / σ̂, line 7
        x_next = x + (s_next - s_hat) * d  # Euler step, line 8
        if second_order and s_next > 0:  # Heun's correction, lines 9-11
            nfe += 1
            d_next = _denoise(model, process, x_next, s_next)[0].eps_hat
            x_next = x + (s_next - s_hat) * 0.5 * (d + d_next)
        if callback is not None:
            seen, after = m_hat * x, _m_at(process, s_next) * x_next
            callback(Step(t=t_hat, x_t=seen, x_next=after, x0_hat=pred.x0_hat, nfe=nfe))
        x = x_next
    return x


@needs("sde")
@torch.no_grad()
def heun(
    model: Predictor,
    x_T: torch.Tensor,
    process: Process,
    *,
    steps: int = 18,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
    S_churn: float = 0.0,
    S_tmin: float = 0.0,
    S_tmax: float = math.inf,
    S_noise: float = 1.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """EDM's sampler (Karras et al. 2022, Algorithm 2): Heun's second-order method on the
    probability-flow ODE over ``steps`` Karras σ's (module docstring), Euler at the last step
    into σ = 0; NFE = 2·steps - 1. With ``S_churn`` > 0, each step whose σ_i lies in [S_tmin,
    S_tmax] first raises the noise to σ̂ = σ_i (1 + γ), γ = min(S_churn / steps, √2 - 1), with
    fresh noise scaled by ``S_noise`` (the stochastic sampler); S_churn = 0 is deterministic
    given x_T. ``sigma_min`` / ``sigma_max`` default to the process's range."""
    return _karras(model, x_T, process, True, steps, sigma_min, sigma_max, rho, S_churn,
                   S_tmin, S_tmax, S_noise, generator, callback)  # fmt: skip


@needs("sde")
@torch.no_grad()
def euler(
    model: Predictor,
    x_T: torch.Tensor,
    process: Process,
    *,
    steps: int = 18,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
    S_churn: float = 0.0,
    S_tmin: float = 0.0,
    S_tmax: float = math.inf,
    S_noise: float = 1.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Euler's first-order method on the same ODE and the same σ steps as :func:`heun` (EDM's
    Algorithm 2 without lines 9-11; with S_churn = 0 DDIM's update in σ̃); NFE = steps."""
    return _karras(model, x_T, process, False, steps, sigma_min, sigma_max, rho, S_churn,
                   S_tmin, S_tmax, S_noise, generator, callback)  # fmt: skip
