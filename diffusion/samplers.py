"""Samplers: free functions with one shared signature.

    sampler(model, x_T, process, *, generator=None, callback=None, **options) -> x_0

``model`` is an ε-predictor ``model(x_t, t)``, ``x_T`` the initial noise (B, C, H, W),
``process`` a :class:`~diffusion.process.GaussianDiffusion`, ``generator`` the source of the
sampler's own noise (so a seed fixes the whole chain), and ``callback`` receives a
:class:`Step` after every network evaluation (for trajectories and progress bars); its ``nfe``
counts the network evaluations so far. Fast samplers take ``steps`` and a ``spacing`` from
:mod:`diffusion.spacing`. A sampler config in ``conf/sampler/`` names the function with
``_partial_: true`` and fixes its options. Loops run in the dtype of ``x_T``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from diffusion.process import EpsModel, GaussianDiffusion, gather
from diffusion.spacing import timesteps


@dataclass
class Step:
    """State handed to a sampler's callback after each network evaluation."""

    t: int | float  #: code index of x_t just denoised (diffusion.process); SDE time or σ
    x_t: torch.Tensor  #: the sample the network saw
    x_next: torch.Tensor  #: the sample after this step (x_0 at the last step)
    x0_hat: torch.Tensor  #: the network's prediction of x_0
    nfe: int  #: network evaluations so far


Callback = Callable[[Step], None]


def _t(step: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)


def _noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)


def respace(process: GaussianDiffusion, kept: list[int]) -> tuple[GaussianDiffusion, torch.Tensor]:
    """The process restricted to code indices ``kept`` (improved-diffusion's respacing).

    With ᾱ'_i = ᾱ_{kept[i]}, the new β'_i = 1 - ᾱ'_i / ᾱ'_{i-1} (ᾱ'_{-1} = 1) make a chain whose
    marginals q(x_i | x_0) are exactly the original ones at the kept steps. Returns the new
    process and the map from its indices to the original ones (for the network's t input).
    """
    kept = sorted(kept)
    alpha_bar = torch.cumprod(1.0 - process.beta64, 0)[kept]
    prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
    return GaussianDiffusion(1.0 - alpha_bar / prev), torch.tensor(kept, dtype=torch.long)


@torch.no_grad()
def ddpm_ancestral(
    model: EpsModel,
    x_T: torch.Tensor,
    process: GaussianDiffusion,
    *,
    variance: str = "beta",
    clip_x0: bool = True,
    steps: int | None = None,
    spacing: str = "uniform",
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Ancestral sampling, Ho et al. 2020 Algorithm 2.

    For t = T-1, …, 0 (code indices): x_{t-1} = μ̃_t(x_t, x̂_0) + σ_t z, z ~ N(0, I), with
    σ_t² = β_t (``variance="beta"``) or β̃_t (``"beta_tilde"``), and no noise at the last step
    (t = 0), which returns the mean. ``clip_x0`` clips x̂_0 to [-1, 1] before forming the mean
    (what DDPM's released sampler does); with it off the mean is Algorithm 2's exactly.
    ``steps`` < T runs the chain on a respaced process (see :func:`respace`).
    """
    index_map = None
    if steps is not None and steps != process.T:
        process, index_map = respace(
            process, timesteps(process.T, steps, spacing, process.alpha_bar)
        )
        index_map = index_map.to(x_T.device)
    net = model if index_map is None else (lambda x, t: model(x, index_map[t]))
    x = x_T
    for i, step in enumerate(reversed(range(process.T))):
        out = process.p_mean_var(net, x, _t(step, x), variance=variance, clip_x0=clip_x0)
        x_next = out["mean"] + out["var"].sqrt() * _noise(x, generator) if step > 0 else out["mean"]
        if callback is not None:
            t_orig = step if index_map is None else int(index_map[step])
            callback(Step(t=t_orig, x_t=x, x_next=x_next, x0_hat=out["x0_hat"], nfe=i + 1))
        x = x_next
    return x


def _alpha_bar_at(process: GaussianDiffusion, t: int, like: torch.Tensor) -> torch.Tensor:
    """ᾱ at code index t, with ᾱ = 1 at t = -1 (the data), shaped to broadcast against ``like``."""
    if t < 0:
        return torch.ones(
            (like.shape[0],) + (1,) * (like.ndim - 1), device=like.device, dtype=like.dtype
        )
    return gather(process.alpha_bar, _t(t, like), like)


def _predict(model, process, x, t, clip_x0):
    """ε̂ and x̂_0 at code index t; with clipping, ε̂ is recomputed from the clipped x̂_0."""
    tt = _t(t, x)
    eps = model(x, tt)
    x0 = process.x0_from_eps(x, tt, eps)
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
        eps = process.eps_from_x0(x, tt, x0)
    return eps, x0


@torch.no_grad()
def ddim(
    model: EpsModel,
    x_T: torch.Tensor,
    process: GaussianDiffusion,
    *,
    steps: int = 50,
    eta: float = 0.0,
    spacing: str = "uniform",
    clip_x0: bool = False,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DDIM (Song, Meng & Ermon 2021, Eq. 12) over ``steps`` indices of ``spacing``.

    From t to the next visited index s (ᾱ_{-1} = 1 for the data):
    x_s = √ᾱ_s x̂_0 + √(1 - ᾱ_s - σ²) ε̂ + σ z, with
    σ = η √((1 - ᾱ_s) / (1 - ᾱ_t)) √(1 - ᾱ_t / ᾱ_s). η = 0 is deterministic (given x_T);
    η = 1 with all T steps is DDPM with σ_t² = β̃_t.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    seq = timesteps(process.T, steps, spacing, process.alpha_bar)
    x = x_T
    for i, t in enumerate(seq):
        s = seq[i + 1] if i + 1 < len(seq) else -1
        eps, x0 = _predict(model, process, x, t, clip_x0)
        ab_t, ab_s = _alpha_bar_at(process, t, x), _alpha_bar_at(process, s, x)
        sigma = eta * ((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)).clamp(min=0).sqrt()
        x_next = ab_s.sqrt() * x0 + (1 - ab_s - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0 and s >= 0:
            x_next = x_next + sigma * _noise(x, generator)
        if callback is not None:
            callback(Step(t=t, x_t=x, x_next=x_next, x0_hat=x0, nfe=i + 1))
        x = x_next
    return x


@torch.no_grad()
def ddim_encode(
    model: EpsModel,
    x0: torch.Tensor,
    process: GaussianDiffusion,
    *,
    steps: int = 50,
    spacing: str = "uniform",
    callback: Callback | None = None,
) -> torch.Tensor:
    """Deterministic DDIM inversion x_0 → x_T (Song et al. 2021, Sec. 4.3, the ODE run forward).

    Visits the same indices as :func:`ddim` in increasing order. The step from level s to t
    inverts DDIM's step from t to s with ε̂(x_s, t) standing in for the unknown ε̂(x_t, t):
    x_t = √ᾱ_t x̂_0 + √(1 - ᾱ_t) ε̂ with x̂_0 = (x_s - √(1 - ᾱ_s) ε̂) / √ᾱ_s (ᾱ_{-1} = 1).
    The round trip's error shrinks as 1/steps (measured on Gaussian data in the tests).
    """
    seq = timesteps(process.T, steps, spacing, process.alpha_bar)[::-1]
    x = x0
    for i, t in enumerate(seq):
        s = seq[i - 1] if i > 0 else -1
        eps = model(x, _t(t, x))
        ab_s, ab_t = _alpha_bar_at(process, s, x), _alpha_bar_at(process, t, x)
        x0_hat = (x - (1 - ab_s).sqrt() * eps) / ab_s.sqrt()
        x_next = ab_t.sqrt() * x0_hat + (1 - ab_t).sqrt() * eps
        if callback is not None:
            callback(Step(t=t, x_t=x, x_next=x_next, x0_hat=x0_hat, nfe=i + 1))
        x = x_next
    return x


@torch.no_grad()
def dpm_solver(
    model: EpsModel,
    x_T: torch.Tensor,
    process: GaussianDiffusion,
    *,
    steps: int = 20,
    spacing: str = "logsnr",
    clip_x0: bool = False,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M), Lu et al. 2022 ("DPM-Solver++", Algorithm 2), data prediction.

    In log-SNR time λ_t = log(α_t / σ_t) (α_t = √ᾱ_t, σ_t = √(1 - ᾱ_t)), with
    h_i = λ_{t_i} - λ_{t_{i-1}}, r_i = h_{i-1} / h_i and
    D_i = (1 + 1/(2 r_i)) x̂_0(t_{i-1}) - 1/(2 r_i) x̂_0(t_{i-2}):
    x_{t_i} = (σ_{t_i} / σ_{t_{i-1}}) x_{t_{i-1}} - α_{t_i} (e^{-h_i} - 1) D_i.
    The first step is first order (D = x̂_0), and so is the last, into the data (σ = 0), which
    returns the last x̂_0 (``lower_order_final``). NFE = ``steps``. ``generator`` is unused: the
    solver is deterministic given x_T.
    """
    seq = timesteps(process.T, steps, spacing, process.alpha_bar)
    x = x_T
    x0_prev: torch.Tensor | None = None
    h_prev: torch.Tensor | None = None
    for i, t in enumerate(seq):
        s = seq[i + 1] if i + 1 < len(seq) else -1
        _, x0 = _predict(model, process, x, t, clip_x0)
        if s < 0:
            x_next = x0
        else:
            ab_t, ab_s = _alpha_bar_at(process, t, x), _alpha_bar_at(process, s, x)
            lam_t = 0.5 * (ab_t.log() - (1 - ab_t).log())
            lam_s = 0.5 * (ab_s.log() - (1 - ab_s).log())
            h = lam_s - lam_t
            if x0_prev is None:
                d = x0
            else:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            x_next = ((1 - ab_s) / (1 - ab_t)).sqrt() * x - ab_s.sqrt() * torch.expm1(-h) * d
            x0_prev, h_prev = x0, h
        if callback is not None:
            callback(Step(t=t, x_t=x, x_next=x_next, x0_hat=x0, nfe=i + 1))
        x = x_next
    return x
