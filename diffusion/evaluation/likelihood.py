"""Bits per dimension from the variational bound of DDPM (Ho et al. 2020, Eq. 5; Nichol &
Dhariwal 2021, Sec. 2), in nats converted to bits.

    L = L_T + Σ_{t=2}^{T} L_{t-1} + L_0,
    L_T     = KL(q(x_T | x_0) || N(0, I))                              (prior term)
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_θ(x_{t-1} | x_t))          (code t = 1..T-1)
    L_0     = -log p_θ(x_0 | x_1), a Gaussian discretised to 256 bins   (code t = 0)

Images are in [-1, 1] with 256 levels (bin width 2/255). p_θ's mean is the posterior mean at the
model's x̂_0, its variance β_t (``"beta"``), β̃_t (``"beta_tilde"``) or the model's learned one;
at code t = 0 the fixed ones use β̃ at t = 1, as improved-diffusion does.
"""

from __future__ import annotations

import math

import torch

from diffusion.processes.ddpm import GaussianDiffusion
from diffusion.processes.prediction import Predictor

LOG2 = math.log(2.0)


def normal_kl(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def _std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor
) -> torch.Tensor:
    """log P(x) per element for x on the 256 levels of [-1, 1] under N(mean, e^{2 log_scale})
    integrated over x's bin (±1/255); the end bins extend to ±∞. In nats."""
    inv_std = torch.exp(-log_scale)
    cdf_plus = _std_normal_cdf(inv_std * (x - mean + 1.0 / 255.0))
    cdf_minus = _std_normal_cdf(inv_std * (x - mean - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_minus = torch.log((1.0 - cdf_minus).clamp(min=1e-12))
    log_mid = torch.log((cdf_plus - cdf_minus).clamp(min=1e-12))
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_minus, log_mid)
    )


def _mean_per_image(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(1)


def vlb_term(
    process: GaussianDiffusion,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    x0_hat: torch.Tensor,
    log_var: torch.Tensor,
) -> torch.Tensor:
    """L_t of the bound in bits per dimension, shape (B,): the KL between the posterior and
    p_θ(x_{t-1} | x_t) = N(μ̃_t(x_t, x̂_0), e^log_var) for code t ≥ 1, the decoder NLL at t = 0."""
    mean, _ = process.q_posterior(x0_hat, x_t, t)
    true_mean, _ = process.q_posterior(x0, x_t, t)
    true_log_var = process.model_log_var(t, x_t, "beta_tilde")
    kl = _mean_per_image(normal_kl(true_mean, true_log_var, mean, log_var))
    decoder = -_mean_per_image(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var))
    return torch.where(t == 0, decoder, kl) / LOG2


@torch.no_grad()
def bits_per_dim(
    model: Predictor,
    x0: torch.Tensor,
    variance: str = "beta_tilde",
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """The bound's terms for images ``x0`` (B, ...) in [-1, 1], in bits per dimension, shape (B,).

    ``model`` predicts on DDPM's process (``model.process``); a learned variance is used when the
    model has one, else ``variance``. Returns ``total``, ``prior`` (L_T), ``vb`` (Σ L_{t-1},
    t ≥ 2) and ``decoder`` (L_0). One network evaluation per step: T per image. ``generator``
    fixes the x_t ~ q(x_t | x_0) draws.
    """
    return bounds(model, x0, (variance,), generator)[variance]


@torch.no_grad()
def bounds(
    model: Predictor,
    x0: torch.Tensor,
    variances: tuple[str, ...],
    generator: torch.Generator | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """:func:`bits_per_dim` for several fixed ``variances`` at once, from the same network
    evaluations and x_t draws: {variance: terms}."""
    process: GaussianDiffusion = model.process
    batch = x0.shape[0]
    t_last = torch.full((batch,), process.T - 1, device=x0.device, dtype=torch.long)
    mean_T, var_T = process.q_mean_var(x0, t_last)
    zeros = torch.zeros_like(x0)
    prior = _mean_per_image(normal_kl(mean_T, var_T.log(), zeros, zeros)) / LOG2
    vb = {v: torch.zeros(batch, device=x0.device, dtype=x0.dtype) for v in variances}
    decoder = dict(vb)
    for step in range(process.T):
        t = torch.full((batch,), step, device=x0.device, dtype=torch.long)
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        x_t = process.q_sample(x0, t, eps)
        pred = model(x_t, t)
        for variance in variances:
            log_var = process.model_log_var(t, x_t, variance, frac=pred.var_frac)
            term = vlb_term(process, x0, x_t, t, pred.x0_hat, log_var)
            if step == 0:
                decoder[variance] = term
            else:
                vb[variance] = vb[variance] + term
    return {
        v: {"total": prior + vb[v] + decoder[v], "prior": prior, "vb": vb[v],
            "decoder": decoder[v]}
        for v in variances
    }  # fmt: skip
