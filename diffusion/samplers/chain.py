"""Chain samplers: ancestral sampling, DDIM (and its inversion) and DPM-Solver++, written
against the kernel x_t = m(t) x_0 + σ(t) ε (diffusion.processes.kernel), so they run on every
process that offers a chain (DDPM's code indices, an SDE's evenly spaced times).

A sampler visits ``steps`` of the process's T chain times, chosen by a spacing
(diffusion.samplers.spacing), from the noisiest down, and then jumps to the data (m = 1, σ = 0).
From a visited time t to the next one s < t, everything follows from (m_t, σ_t, m_s, σ_s),
computed in float64:

    q(x_t | x_s)      = N(a x_s, σ²_{t|s} I),  a = m_t / m_s,  σ²_{t|s} = σ_t² - a² σ_s²
    q(x_s | x_t, x_0) = N(a σ_s² / σ_t² · x_t + m_s σ²_{t|s} / σ_t² · x_0,  σ²_{t|s} σ_s² / σ_t² I)

(Kingma et al. 2021, Eqs. 2-4 and 28). For DDPM's adjacent indices a = √α_t, σ²_{t|s} = β_t and
the posterior is Ho et al.'s Eq. 7; for fewer steps it is improved-diffusion's respacing. In
k-diffusion's variables (x̃ = x / m, σ̃ = σ / m) DDIM is Euler's method on dx̃ / dσ̃ = ε̂.
"""

from __future__ import annotations

import math

import torch

from diffusion.processes.kernel import Process, batch_of
from diffusion.processes.prediction import Predictor
from diffusion.samplers.base import Callback, Step, needs, noise
from diffusion.samplers.spacing import timesteps


def visited_times(process: Process, steps: int | None, spacing: str) -> list[float]:
    """The chain times a sampler visits, noisiest first: ``steps`` of the T chain times chosen
    by ``spacing`` (all of them for ``steps=None``)."""
    times = process.chain_times()
    if steps is None or steps == process.T:
        return times.flip(0).tolist()
    index = timesteps(process.T, steps, spacing, process.log_snr(times))
    return times[index].tolist()


def kernel_at(process: Process, t: float | None) -> tuple[float, float]:
    """(m, σ) at time t in float64; (1, 0) for the data (t = None)."""
    if t is None:
        return 1.0, 0.0
    m, sigma = process.marginal(torch.tensor([t], dtype=torch.float64))
    return float(m), float(sigma)


def posterior(m_t: float, sigma_t: float, m_s: float, sigma_s: float) -> dict[str, float]:
    """The step from t to s < t: ``coef_xt``, ``coef_x0`` and ``var`` of q(x_s | x_t, x_0), and
    ``var_ts`` = σ²_{t|s} of q(x_t | x_s) (module docstring)."""
    a = m_t / m_s
    var_ts = max(sigma_t**2 - a * a * sigma_s**2, 0.0)
    return {
        "coef_xt": a * sigma_s**2 / sigma_t**2,
        "coef_x0": m_s * var_ts / sigma_t**2,
        "var": var_ts * sigma_s**2 / sigma_t**2,
        "var_ts": var_ts,
    }


def _walk(process: Process, steps: int | None, spacing: str):
    """(i, t, s, (m_t, σ_t), (m_s, σ_s)) for each visited t, with s the next time (None: data)."""
    seq = visited_times(process, steps, spacing)
    for i, t in enumerate(seq):
        s = seq[i + 1] if i + 1 < len(seq) else None
        yield i, t, s, kernel_at(process, t), kernel_at(process, s)


@needs("chain", learned_variance=True)
@torch.no_grad()
def ddpm_ancestral(
    model: Predictor,
    x_T: torch.Tensor,
    process: Process,
    *,
    variance: str = "beta",
    clip_x0: bool = True,
    steps: int | None = None,
    spacing: str = "uniform",
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Ancestral sampling, Ho et al. 2020 Algorithm 2, on any chain.

    x_s = μ̃(x_t, x̂_0) + σ z from each visited t to the next s, with σ² = σ²_{t|s} (β_t for
    DDPM, ``variance="beta"``), the posterior's variance (β̃_t, ``"beta_tilde"``), or a learned
    one, exp(frac log σ²_{t|s} + (1 - frac) log β̃), between the bounds of *this* step, so a
    respaced chain interpolates its own β' and β̃' (Nichol & Dhariwal 2021, Sec. 4). No noise at
    the last step, which returns the mean. ``clip_x0`` clips x̂_0 to [-1, 1] before forming the
    mean (DDPM's released sampler); without it the mean is Algorithm 2's exactly. ``steps`` < T
    visits ``steps`` chain times chosen by ``spacing`` (improved-diffusion's respacing).
    """
    if variance not in ("beta", "beta_tilde"):
        raise ValueError(f"variance must be 'beta' or 'beta_tilde', got {variance!r}")
    x = x_T * process.prior_std
    for i, t, s, (m_t, sigma_t), (m_s, sigma_s) in _walk(process, steps, spacing):
        pred = model(x, batch_of(t, x))
        if clip_x0:
            pred = pred.clipped()
        post = posterior(m_t, sigma_t, m_s, sigma_s)
        x_next = post["coef_xt"] * x + post["coef_x0"] * pred.x0_hat
        if s is not None:
            if pred.var_frac is not None:
                log_var = pred.var_frac * math.log(post["var_ts"]) + (1 - pred.var_frac) * math.log(
                    post["var"]
                )
                x_next = x_next + torch.exp(0.5 * log_var) * noise(x, generator)
            else:
                var = post["var_ts"] if variance == "beta" else post["var"]
                x_next = x_next + math.sqrt(var) * noise(x, generator)
        if callback is not None:
            callback(Step(t=t, x_t=x, x_next=x_next, x0_hat=pred.x0_hat, nfe=i + 1))
        x = x_next
    return x


@needs("chain")
@torch.no_grad()
def ddim(
    model: Predictor,
    x_T: torch.Tensor,
    process: Process,
    *,
    steps: int = 50,
    eta: float = 0.0,
    spacing: str = "uniform",
    clip_x0: bool = False,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DDIM (Song, Meng & Ermon 2021, Eq. 12) over ``steps`` chain times of ``spacing``.

    From t to the next visited time s (the data last): x_s = m_s x̂_0 + √(σ_s² - c²) ε̂ + c z,
    with c² = η² times the posterior variance σ²_{t|s} σ_s² / σ_t² (for DDPM
    η² (1 - ᾱ_s) / (1 - ᾱ_t) (1 - ᾱ_t / ᾱ_s)). η = 0 is deterministic (given x_T); η = 1 with all
    T steps is DDPM with σ_t² = β̃_t.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    x = x_T * process.prior_std
    for i, t, s, (m_t, sigma_t), (m_s, sigma_s) in _walk(process, steps, spacing):
        pred = model(x, batch_of(t, x))
        if clip_x0:
            pred = pred.clipped()
        c2 = eta**2 * posterior(m_t, sigma_t, m_s, sigma_s)["var"]
        x_next = m_s * pred.x0_hat + math.sqrt(max(sigma_s**2 - c2, 0.0)) * pred.eps_hat
        if eta > 0 and s is not None:
            x_next = x_next + math.sqrt(c2) * noise(x, generator)
        if callback is not None:
            callback(Step(t=t, x_t=x, x_next=x_next, x0_hat=pred.x0_hat, nfe=i + 1))
        x = x_next
    return x


@torch.no_grad()
def ddim_encode(
    model: Predictor,
    x0: torch.Tensor,
    process: Process,
    *,
    steps: int = 50,
    spacing: str = "uniform",
    callback: Callback | None = None,
) -> torch.Tensor:
    """Deterministic DDIM inversion x_0 → x_T (Song et al. 2021, Sec. 4.3, the ODE run forward).

    Visits the same times as :func:`ddim` in increasing order. The step from s up to t inverts
    DDIM's step from t to s, with ε̂ of x_s shown at time t standing in for the unknown ε̂(x_t):
    x_t = m_t x̂_0 + σ_t ε̂ with x̂_0 = (x_s - σ_s ε̂) / m_s (the data first: m = 1, σ = 0).
    The round trip's error shrinks as 1/steps (measured on Gaussian data in the tests). Returns
    x_T in units of the prior's std (the noise a sampler starts from).
    """
    seq = visited_times(process, steps, spacing)[::-1]
    x = x0
    for i, t in enumerate(seq):
        m_s, sigma_s = kernel_at(process, seq[i - 1] if i > 0 else None)
        m_t, sigma_t = kernel_at(process, t)
        eps = model(x, batch_of(t, x)).eps_hat
        x0_hat = (x - sigma_s * eps) / m_s
        x_next = m_t * x0_hat + sigma_t * eps
        if callback is not None:
            callback(Step(t=t, x_t=x, x_next=x_next, x0_hat=x0_hat, nfe=i + 1))
        x = x_next
    return x / process.prior_std


@needs("chain")
@torch.no_grad()
def dpm_solver(
    model: Predictor,
    x_T: torch.Tensor,
    process: Process,
    *,
    steps: int = 20,
    spacing: str = "logsnr",
    clip_x0: bool = False,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M), Lu et al. 2022 ("DPM-Solver++", Algorithm 2), data prediction.

    In λ = log(m / σ), with h_i = λ_{t_i} - λ_{t_{i-1}}, r_i = h_{i-1} / h_i and
    D_i = (1 + 1/(2 r_i)) x̂_0(t_{i-1}) - 1/(2 r_i) x̂_0(t_{i-2}):
    x_{t_i} = (σ_{t_i} / σ_{t_{i-1}}) x_{t_{i-1}} - m_{t_i} (e^{-h_i} - 1) D_i.
    The first step is first order (D = x̂_0), and so is the last, into the data (σ = 0), which
    returns the last x̂_0 (``lower_order_final``). NFE = ``steps``. ``generator`` is unused: the
    solver is deterministic given x_T.
    """
    x = x_T * process.prior_std
    x0_prev: torch.Tensor | None = None
    h_prev = 0.0
    for i, t, s, (m_t, sigma_t), (m_s, sigma_s) in _walk(process, steps, spacing):
        pred = model(x, batch_of(t, x))
        if clip_x0:
            pred = pred.clipped()
        x0 = pred.x0_hat
        if s is None:
            x_next = x0
        else:
            h = math.log(m_s / sigma_s) - math.log(m_t / sigma_t)
            if x0_prev is None:
                d = x0
            else:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            x_next = (sigma_s / sigma_t) * x - m_s * math.expm1(-h) * d
            x0_prev, h_prev = x0, h
        if callback is not None:
            callback(Step(t=t, x_t=x, x_next=x_next, x0_hat=x0, nfe=i + 1))
        x = x_next
    return x
