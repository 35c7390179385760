"""Noise schedules: the variances β_1..β_T of the forward process (Ho et al. 2020, Eq. 2).

Every schedule is a function ``(T) -> beta`` returning a float64 tensor of shape (T,), entry
``beta[t]`` for code index t = 0..T-1 (paper step t + 1; see :mod:`diffusion.process`).
A schedule config in ``conf/schedule/`` names the function with ``_partial_: true`` and fixes
its other parameters, so adding a schedule is one function here plus one YAML file.

The β-space schedules (linear, quadratic, sigmoid) take their end points *at T = 1000* and scale
them by 1000 / T, as improved-diffusion does for ``linear``, so that Σβ (and so ᾱ_T) stays
about the same for any T. A β pushed past 0.999 by that scaling (T < 21 for the linear default)
is clipped to 0.999, like the cosine schedule's.
"""

from __future__ import annotations

import math

import torch

MAX_BETA = 0.999


def _check_T(T: int) -> None:
    if not isinstance(T, int) or isinstance(T, bool) or T < 1:
        raise ValueError(f"T must be an integer >= 1, got {T!r}")


def _scaled(beta_start: float, beta_end: float, T: int) -> tuple[float, float]:
    if not 0 < beta_start <= beta_end < 1:
        raise ValueError(
            f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}"
        )
    scale = 1000.0 / T
    return beta_start * scale, beta_end * scale


def linear(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """β_t linear from ``beta_start`` to ``beta_end`` (Ho et al. 2020, Sec. 4), at T=1000."""
    _check_T(T)
    start, end = _scaled(beta_start, beta_end, T)
    beta = torch.linspace(start, end, T, dtype=torch.float64)
    return beta.clamp(max=MAX_BETA)


def quadratic(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """√β_t linear from √beta_start to √beta_end (diffusers' ``scaled_linear``), at T=1000."""
    _check_T(T)
    start, end = _scaled(beta_start, beta_end, T)
    beta = torch.linspace(math.sqrt(start), math.sqrt(end), T, dtype=torch.float64) ** 2
    return beta.clamp(max=MAX_BETA)


def sigmoid(
    T: int, beta_start: float = 1e-4, beta_end: float = 0.02, span: float = 6.0
) -> torch.Tensor:
    """β_t = beta_start + (beta_end - beta_start) · sigmoid(u_t), u_t linear in [-span, span].

    The β-space sigmoid schedule of the DDIM code base and diffusers (``span = 6``); not the
    ᾱ-space sigmoid of Jabri et al. 2022. End points at T = 1000, scaled by 1000 / T.
    """
    _check_T(T)
    start, end = _scaled(beta_start, beta_end, T)
    u = torch.linspace(-span, span, T, dtype=torch.float64)
    beta = start + (end - start) * torch.sigmoid(u)
    return beta.clamp(max=MAX_BETA)


def cosine(T: int, s: float = 0.008, max_beta: float = MAX_BETA) -> torch.Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021, Eq. 17).

    ᾱ(t) = f(t) / f(0), f(t) = cos²(π/2 · (t/T + s) / (1 + s)), and
    β_t = min(1 - ᾱ(t) / ᾱ(t - 1), max_beta) for t = 1..T (code index t - 1).
    At T = 1000 only the last β reaches the clip (ᾱ(T) = 0 exactly).
    """
    _check_T(T)
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    beta = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return beta.clamp(max=max_beta)


def tabulated(T: int, beta: list[float]) -> torch.Tensor:
    """β given value by value (a schedule made elsewhere: diffusers' ``trained_betas``, or any
    of its formulas computed by diffusion.interchange); ``len(beta)`` must be T."""
    _check_T(T)
    if len(beta) != T:
        raise ValueError(f"schedule.beta has {len(beta)} values, T={T}")
    return torch.tensor(list(beta), dtype=torch.float64)


def validate_beta(beta: torch.Tensor) -> torch.Tensor:
    """Check that ``beta`` is a usable schedule: 1-D, every β in (0, 1), so ᾱ strictly decreases.

    Raises ValueError naming the first offending index and value.
    """
    if beta.ndim != 1 or beta.numel() < 1:
        raise ValueError(f"beta must be a non-empty 1-D tensor, got shape {tuple(beta.shape)}")
    bad = ~((beta > 0) & (beta < 1))
    if bad.any():
        t = int(bad.nonzero()[0])
        raise ValueError(
            f"beta[{t}] = {float(beta[t])!r} is outside (0, 1); every beta must lie in (0, 1) "
            "so that alpha_bar decreases strictly"
        )
    return beta
