"""Samplers of the score-based families, with the signature of :mod:`diffusion.samplers`:

    sampler(model, x_T, process, *, generator=None, callback=None, **options) -> x_0

``process`` is a :class:`~diffusion.sde.SDE` (an :class:`~diffusion.sde.NCSN` for annealed
Langevin), ``model`` the ε-network, and ``x_T`` standard normal noise, scaled here by the
process's prior std (σ_max for VE and NCSN). Scores come from ε̂ (s = -ε̂ / σ); the predicted
x_0 handed to the callback is Tweedie's E[x_0 | x_t] = (x_t + σ² s) / m. Stochastic samplers
end with their last step's mean (no noise), as in Song et al. 2021's code.
"""

from __future__ import annotations

import numpy as np
import torch

from diffusion.process import EpsModel
from diffusion.samplers import Callback, Step, _noise
from diffusion.sde import NCSN, SDE, VPSDE, per_example


def _batch(value: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), float(value), device=x.device, dtype=x.dtype)


def _tweedie(sde: SDE, x: torch.Tensor, t: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    m, sigma = sde.marginal(t)
    return (x + per_example(sigma, x) ** 2 * score) / per_example(m, x)


@torch.no_grad()
def euler_maruyama(
    model: EpsModel,
    x_T: torch.Tensor,
    sde: SDE,
    *,
    steps: int = 1000,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """The reverse-time SDE dx = [f(t) x - g(t)² s(x, t)] dt + g(t) dw̄ (Song et al. 2021,
    Eq. 6) by Euler–Maruyama from t = 1 to ε in ``steps`` steps of dt = -(1 - ε) / steps."""
    x = x_T * sde.prior_std
    dt = (1.0 - sde.eps) / steps
    for i, t in enumerate(torch.linspace(1.0, sde.eps, steps).tolist()):
        tb = _batch(t, x)
        score = sde.score(model, x, tb)
        mean = x - sde.reverse_drift(x, tb, score) * dt
        g = per_example(sde.coefficients(tb)[1], x)
        x_next = mean + g * dt**0.5 * _noise(x, generator) if i + 1 < steps else mean
        if callback is not None:
            callback(Step(t, x, x_next, _tweedie(sde, x, tb, score), nfe=i + 1))
        x = x_next
    return x


@torch.no_grad()
def predictor_corrector(
    model: EpsModel,
    x_T: torch.Tensor,
    sde: SDE,
    *,
    steps: int = 1000,
    predictor: str = "reverse_diffusion",
    corrector_steps: int = 1,
    snr: float = 0.16,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Predictor–corrector sampling (Song et al. 2021, Algorithms 2 and 3).

    At each of ``steps`` times from 1 to ε: ``corrector_steps`` Langevin steps
    x ← x + δ s + √(2δ) z with δ = 2 α (snr ‖z‖ / ‖s‖)² per sample (α = 1 - β_i for the VP
    family, 1 otherwise), then one predictor step: ``reverse_diffusion``,
    x ← x - f_i + G_i² s + G_i z with the SDE's own chain (:meth:`SDE.discretize`), or
    ``euler_maruyama`` (as :func:`euler_maruyama`). NFE = steps · (1 + corrector_steps).
    """
    if predictor not in ("reverse_diffusion", "euler_maruyama"):
        raise ValueError(
            f"predictor must be reverse_diffusion or euler_maruyama, got {predictor!r}"
        )
    x = x_T * sde.prior_std
    dt = (1.0 - sde.eps) / steps
    nfe = 0
    for i, t in enumerate(torch.linspace(1.0, sde.eps, steps).tolist()):
        tb = _batch(t, x)
        for _ in range(corrector_steps):
            score = sde.score(model, x, tb)
            z = _noise(x, generator)
            alpha = 1.0 - per_example(sde.beta(tb) * dt, x) if isinstance(sde, VPSDE) else 1.0
            ratio = z.flatten(1).norm(dim=1) / score.flatten(1).norm(dim=1).clamp(min=1e-12)
            delta = 2.0 * alpha * per_example(snr * ratio, x) ** 2
            x = x + delta * score + (2.0 * delta).sqrt() * z
            nfe += 1
        score = sde.score(model, x, tb)
        nfe += 1
        if predictor == "reverse_diffusion":
            f, G = sde.discretize(x, tb, dt)
            mean = x - f + G**2 * score
        else:
            mean = x - sde.reverse_drift(x, tb, score) * dt
            G = per_example(sde.coefficients(tb)[1], x) * dt**0.5
        x_next = mean + G * _noise(x, generator) if i + 1 < steps else mean
        if callback is not None:
            callback(Step(t, x, x_next, _tweedie(sde, x, tb, score), nfe=nfe))
        x = x_next
    return x


@torch.no_grad()
def probability_flow(
    model: EpsModel,
    x_T: torch.Tensor,
    sde: SDE,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "RK45",
    denoise: bool = True,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """The probability-flow ODE dx/dt = f(t) x - ½ g(t)² s(x, t) (Song et al. 2021, Eq. 13)
    from t = 1 to ε with scipy's adaptive ``solve_ivp`` (RK45 by default, as the paper's code);
    the NFE is the solver's. The whole batch is one ODE system, so step sizes are shared.
    ``denoise`` ends with Tweedie's x̂_0 at ε (one more evaluation). Deterministic given x_T.
    """
    from scipy.integrate import solve_ivp

    x = x_T * sde.prior_std
    shape, device, dtype = x.shape, x.device, x.dtype
    nfe = 0

    def velocity(t: float, y: np.ndarray) -> np.ndarray:
        nonlocal nfe
        x_t = torch.from_numpy(y).reshape(shape).to(device, dtype)
        tb = _batch(t, x_t)
        score = sde.score(model, x_t, tb)
        dx = sde.reverse_drift(x_t, tb, score, probability_flow=True)
        nfe += 1
        if callback is not None:
            callback(Step(t, x_t, x_t, _tweedie(sde, x_t, tb, score), nfe=nfe))
        return dx.flatten().double().cpu().numpy()

    y0 = x.flatten().double().cpu().numpy()
    solution = solve_ivp(velocity, (1.0, sde.eps), y0, method=method, rtol=rtol, atol=atol)
    if not solution.success:
        raise RuntimeError(f"probability-flow ODE solver failed: {solution.message}")
    x = torch.from_numpy(solution.y[:, -1]).reshape(shape).to(device, dtype)
    if denoise:
        tb = _batch(sde.eps, x)
        score = sde.score(model, x, tb)
        x0 = _tweedie(sde, x, tb, score)
        nfe += 1
        if callback is not None:
            callback(Step(sde.eps, x, x0, x0, nfe=nfe))
        x = x0
    return x


@torch.no_grad()
def annealed_langevin(
    model: EpsModel,
    x_T: torch.Tensor,
    ncsn: NCSN,
    *,
    steps_per_level: int = 100,
    step_size: float = 2e-5,
    denoise: bool = True,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1).

    For σ_1 > … > σ_L, with α_i = ε σ_i² / σ_L² (``step_size`` = ε): ``steps_per_level`` steps
    x ← x + (α_i / 2) s(x, σ_i) + √α_i z. Starts from N(0, σ_1² I); ``denoise`` adds the final
    step x ← x + σ_L² s(x, σ_L) (Tweedie; Jolicoeur-Martineau et al. 2021, NCSNv2's default).
    NFE = L · steps_per_level (+ 1).
    """
    x = x_T * ncsn.prior_std
    sigma_last = float(ncsn.sigmas[-1])
    nfe = 0
    for sigma in ncsn.sigmas.tolist():
        sb = _batch(sigma, x)
        alpha = step_size * (sigma / sigma_last) ** 2
        for _ in range(steps_per_level):
            score = ncsn.score(model, x, sb)
            x_next = x + 0.5 * alpha * score + alpha**0.5 * _noise(x, generator)
            nfe += 1
            if callback is not None:
                callback(Step(sigma, x, x_next, x + sigma**2 * score, nfe=nfe))
            x = x_next
    if denoise:
        sb = _batch(sigma_last, x)
        x0 = x + sigma_last**2 * ncsn.score(model, x, sb)
        nfe += 1
        if callback is not None:
            callback(Step(sigma_last, x, x0, x0, nfe=nfe))
        x = x0
    return x
