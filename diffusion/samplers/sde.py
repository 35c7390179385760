"""SDE samplers (Song et al. 2021): the reverse-time SDE, predictor–corrector, and the
probability-flow ODE, for every process with an SDE view (diffusion.processes.kernel.SDEView):
the score SDEs, and DDPM through its continuous-time kernel.

Time runs from the process's ``t_max`` down to ``t_min``; the score is the model's -ε̂ / σ and
the x̂_0 handed to the callback is Tweedie's E[x_0 | x_t]. Stochastic samplers end with their
last step's mean (no noise), as in Song et al. 2021's code.
"""

from __future__ import annotations

import numpy as np
import torch

from diffusion.processes.kernel import Process, batch_of, per_example
from diffusion.processes.prediction import Predictor
from diffusion.samplers.base import Callback, Step, needs, noise

PREDICTORS = ("reverse_diffusion", "euler_maruyama")


def _times(process: Process, steps: int) -> tuple[list[float], float]:
    """``steps`` evenly spaced times from t_max to t_min, and the step dt = (t_max - t_min) /
    steps (Song et al.'s code: the grid has steps - 1 gaps, each step moves dt)."""
    times = torch.linspace(process.t_max, process.t_min, steps, dtype=torch.float64).tolist()
    return times, (process.t_max - process.t_min) / steps


@needs("sde")
@torch.no_grad()
def euler_maruyama(
    model: Predictor,
    x_T: torch.Tensor,
    process: Process,
    *,
    steps: int = 1000,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """The reverse-time SDE dx = [f(t) x - g(t)² s(x, t)] dt + g(t) dw̄ (Song et al. 2021,
    Eq. 6) by Euler–Maruyama from t_max to t_min in ``steps`` steps."""
    x = x_T * process.prior_std
    times, dt = _times(process, steps)
    for i, t in enumerate(times):
        tb = batch_of(t, x)
        pred = model(x, tb)
        mean = x - process.reverse_drift(x, tb, pred.score) * dt
        g = per_example(process.coefficients(tb)[1], x)
        x_next = mean + g * dt**0.5 * noise(x, generator) if i + 1 < steps else mean
        if callback is not None:
            callback(Step(t, x, x_next, pred.x0_hat, nfe=i + 1))
        x = x_next
    return x


@needs("sde")
@torch.no_grad()
def predictor_corrector(
    model: Predictor,
    x_T: torch.Tensor,
    process: Process,
    *,
    steps: int = 1000,
    predictor: str = "reverse_diffusion",
    corrector_steps: int = 1,
    snr: float = 0.16,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Predictor–corrector sampling (Song et al. 2021, Algorithms 2 and 3).

    At each of ``steps`` times from t_max to t_min: ``corrector_steps`` Langevin steps
    x ← x + δ s + √(2δ) z with δ = 2 α (snr ‖z‖ / ‖s‖)² per sample, α = a² of the process's
    forward step (1 - β_i for VP, 1 for VE), then one predictor step: ``reverse_diffusion``,
    x ← x - (a - 1) x + G² s + G z with the process's own forward step x_t = a x + G z
    (:meth:`~diffusion.processes.kernel.SDEView.discretize`), or ``euler_maruyama`` (as
    :func:`euler_maruyama`). NFE = steps · (1 + corrector_steps).
    """
    if predictor not in PREDICTORS:
        raise ValueError(f"predictor must be one of {list(PREDICTORS)}, got {predictor!r}")
    x = x_T * process.prior_std
    times, dt = _times(process, steps)
    nfe = 0
    for i, t in enumerate(times):
        tb = batch_of(t, x)
        a, G = (per_example(v, x) for v in process.discretize(tb, dt))
        for _ in range(corrector_steps):
            score = model(x, tb).score
            z = noise(x, generator)
            ratio = z.flatten(1).norm(dim=1) / score.flatten(1).norm(dim=1).clamp(min=1e-12)
            delta = 2.0 * a**2 * per_example(snr * ratio, x) ** 2
            x = x + delta * score + (2.0 * delta).sqrt() * z
            nfe += 1
        pred = model(x, tb)
        nfe += 1
        if predictor == "reverse_diffusion":
            mean = x - (a - 1.0) * x + G**2 * pred.score
        else:
            mean = x - process.reverse_drift(x, tb, pred.score) * dt
            G = per_example(process.coefficients(tb)[1], x) * dt**0.5
        x_next = mean + G * noise(x, generator) if i + 1 < steps else mean
        if callback is not None:
            callback(Step(t, x, x_next, pred.x0_hat, nfe=nfe))
        x = x_next
    return x


@needs("sde")
@torch.no_grad()
def probability_flow(
    model: Predictor,
    x_T: torch.Tensor,
    process: Process,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "RK45",
    denoise: bool = True,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """The probability-flow ODE dx/dt = f(t) x - ½ g(t)² s(x, t) (Song et al. 2021, Eq. 13)
    from t_max to t_min with scipy's adaptive ``solve_ivp`` (RK45 by default, as the paper's
    code); the NFE is the solver's. The whole batch is one ODE system, so step sizes are shared.
    ``denoise`` ends with Tweedie's x̂_0 at t_min (one more evaluation). Deterministic given x_T.
    """
    from scipy.integrate import solve_ivp

    x = x_T * process.prior_std
    shape, device, dtype = x.shape, x.device, x.dtype
    nfe = 0

    def velocity(t: float, y: np.ndarray) -> np.ndarray:
        nonlocal nfe
        x_t = torch.from_numpy(y).reshape(shape).to(device, dtype)
        tb = batch_of(t, x_t)
        pred = model(x_t, tb)
        dx = process.reverse_drift(x_t, tb, pred.score, probability_flow=True)
        nfe += 1
        if callback is not None:
            callback(Step(t, x_t, x_t, pred.x0_hat, nfe=nfe))
        return dx.flatten().double().cpu().numpy()

    y0 = x.flatten().double().cpu().numpy()
    span = (process.t_max, process.t_min)
    solution = solve_ivp(velocity, span, y0, method=method, rtol=rtol, atol=atol)
    if not solution.success:
        raise RuntimeError(f"probability-flow ODE solver failed: {solution.message}")
    x = torch.from_numpy(solution.y[:, -1]).reshape(shape).to(device, dtype)
    if denoise:
        x0 = model(x, batch_of(process.t_min, x)).x0_hat
        nfe += 1
        if callback is not None:
            callback(Step(process.t_min, x, x0, x0, nfe=nfe))
        x = x0
    return x
