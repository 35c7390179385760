"""The Gaussian diffusion process of DDPM (Ho et al. 2020), as a module of constant buffers.

Time convention (used everywhere in this package): **t counts from 0**. Code index
t ∈ {0, …, T-1} is the paper's step t + 1, so ``x_t`` in code is the paper's x_{t+1}, the
data x_0 sits "before" index 0, and

    alpha_bar[t]      = ∏_{i ≤ t} (1 - beta[i])        (paper ᾱ_{t+1})
    alpha_bar_prev[t] = alpha_bar[t - 1], with alpha_bar_prev[0] = 1 (paper ᾱ_t, ᾱ_0 = 1).

Constants are computed once in float64 and stored as float32 buffers (float32 keeps the module
movable to any device); every method gathers them per batch with :func:`gather`.
Shapes: images are (B, C, H, W) or any (B, ...); ``t`` is a LongTensor of shape (B,).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from diffusion.schedules import validate_beta

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""An ε-prediction network: ``eps_hat = model(x_t, t)``, same shape as ``x_t``."""


def gather(constant: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``constant[t]`` reshaped to (B, 1, 1, ...) to broadcast against ``like``, in its dtype."""
    out = constant.to(like.device)[t].to(like.dtype)
    return out.reshape(t.shape[0], *([1] * (like.ndim - 1)))


class GaussianDiffusion(nn.Module):
    """Forward process q, posterior q(x_{t-1} | x_t, x_0), reverse step p_θ and L_simple.

    Args:
        beta: the schedule β, shape (T,), any float dtype (converted to float64 first).
    """

    def __init__(self, beta: torch.Tensor) -> None:
        super().__init__()
        beta = validate_beta(torch.as_tensor(beta, dtype=torch.float64))
        T = beta.shape[0]
        alpha = 1.0 - beta
        alpha_bar = torch.cumprod(alpha, dim=0)
        alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
        # β̃_t = (1 - ᾱ_{t-1}) / (1 - ᾱ_t) · β_t (Ho et al. Eq. 7); 0 at t = 0 since ᾱ_prev = 1.
        posterior_var = beta * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
        # log β̃ with its t = 0 entry (log 0) replaced by β̃ at t = 1, as improved-diffusion does.
        first = posterior_var[1:2] if T > 1 else beta[:1]
        posterior_log_var_clipped = torch.log(torch.cat([first, posterior_var[1:]]))
        constants = {
            "beta": beta,
            "alpha": alpha,
            "alpha_bar": alpha_bar,
            "alpha_bar_prev": alpha_bar_prev,
            "sqrt_alpha_bar": alpha_bar.sqrt(),
            "sqrt_one_minus_alpha_bar": (1.0 - alpha_bar).sqrt(),
            "sqrt_recip_alpha_bar": alpha_bar.rsqrt(),
            "sqrt_recipm1_alpha_bar": (1.0 / alpha_bar - 1.0).sqrt(),
            "posterior_var": posterior_var,
            "posterior_log_var_clipped": posterior_log_var_clipped,
            # μ̃_t(x_t, x_0) = coef_x0 · x_0 + coef_xt · x_t (Ho et al. Eq. 7)
            "posterior_coef_x0": beta * alpha_bar_prev.sqrt() / (1.0 - alpha_bar),
            "posterior_coef_xt": (1.0 - alpha_bar_prev) * alpha.sqrt() / (1.0 - alpha_bar),
            "snr": alpha_bar / (1.0 - alpha_bar),
        }
        for name, value in constants.items():
            self.register_buffer(name, value.float(), persistent=name == "beta")
        self.T = T
        self._log_alpha_bar64 = torch.log(alpha_bar)  # for fractional steps (float64, CPU)
        self._beta64 = beta  # exact schedule, saved with checkpoints by the LightningModule

    @property
    def beta64(self) -> torch.Tensor:
        """The schedule exactly as computed, float64 on the CPU."""
        return self._beta64

    def moments_at_label(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(√ᾱ_t, √(1-ᾱ_t)) at steps ``t`` (B,): q(x_t | x_0) = N(m x_0, σ² I). Fractional
        steps (from the SDE samplers, see :func:`fractional_step`) interpolate log ᾱ."""
        if not t.is_floating_point():
            return self.sqrt_alpha_bar.to(t.device)[t], self.sqrt_one_minus_alpha_bar.to(t.device)[
                t
            ]
        log_alpha_bar = self._log_alpha_bar64.to(t.device)
        t = t.double().clamp(0, self.T - 1)
        low = t.floor().long().clamp(max=self.T - 2) if self.T > 1 else t.long()
        frac = t - low
        high = (low + 1).clamp(max=self.T - 1)
        alpha_bar = torch.exp((1 - frac) * log_alpha_bar[low] + frac * log_alpha_bar[high])
        return alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()

    def fractional_step(self, alpha_bar: torch.Tensor) -> torch.Tensor:
        """The (fractional) step whose ᾱ is ``alpha_bar``, interpolating log ᾱ; clamped to
        [0, T-1]. The inverse of :meth:`moments_at_label` on floats."""
        neg_log = -self._log_alpha_bar64.to(alpha_bar.device)
        y = -torch.log(alpha_bar.double())
        high = torch.searchsorted(neg_log, y).clamp(1, self.T - 1)
        low = high - 1
        frac = ((y - neg_log[low]) / (neg_log[high] - neg_log[low])).clamp(0, 1)
        return (low + frac).clamp(0, self.T - 1)

    # ----- forward process --------------------------------------------------------------
    def q_step(self, x_prev: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x_{t-1}) = N(√(1-β_t) x_{t-1}, β_t I) (Ho et al. Eq. 2), one step."""
        return (
            gather(self.alpha, t, x_prev).sqrt() * x_prev
            + gather(self.beta, t, x_prev).sqrt() * eps
        )

    def q_mean_var(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean √ᾱ_t x_0 and variance (1 - ᾱ_t) of q(x_t | x_0) (Ho et al. Eq. 4)."""
        mean = gather(self.sqrt_alpha_bar, t, x0) * x0
        return mean, gather(1.0 - self.alpha_bar, t, x0)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x_0) in one shot: x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε (Ho et al. Eq. 4)."""
        return (
            gather(self.sqrt_alpha_bar, t, x0) * x0
            + gather(self.sqrt_one_minus_alpha_bar, t, x0) * eps
        )

    # ----- posterior and conversions ----------------------------------------------------
    def q_posterior(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean μ̃_t(x_t, x_0) and variance β̃_t of q(x_{t-1} | x_t, x_0) (Ho et al. Eqs. 6-7)."""
        mean = (
            gather(self.posterior_coef_x0, t, x_t) * x0
            + gather(self.posterior_coef_xt, t, x_t) * x_t
        )
        return mean, gather(self.posterior_var, t, x_t)

    def x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - √(1-ᾱ_t) ε) / √ᾱ_t, Eq. 4 solved for x_0."""
        return (
            gather(self.sqrt_recip_alpha_bar, t, x_t) * x_t
            - gather(self.sqrt_recipm1_alpha_bar, t, x_t) * eps
        )

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """ε = (x_t - √ᾱ_t x_0) / √(1-ᾱ_t), Eq. 4 solved for ε."""
        return (gather(self.sqrt_recip_alpha_bar, t, x_t) * x_t - x0) / gather(
            self.sqrt_recipm1_alpha_bar, t, x_t
        )

    def score_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """∇ log q(x_t) = -ε / √(1-ᾱ_t) (Tweedie; Song et al. 2021, Eq. 10 for DDPM)."""
        return -eps / gather(self.sqrt_one_minus_alpha_bar, t, x_t)

    # ----- reverse process ----------------------------------------------------------------
    def p_mean_var(
        self,
        model: EpsModel,
        x_t: torch.Tensor,
        t: torch.Tensor,
        variance: str = "beta",
        clip_x0: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Mean and variance of p_θ(x_{t-1} | x_t) = N(μ̃_t(x_t, x̂_0), σ_t² I).

        x̂_0 comes from the model's ε̂ (optionally clipped to [-1, 1]); without clipping the mean
        equals Algorithm 2's 1/√α_t (x_t - β_t / √(1-ᾱ_t) ε̂). ``variance`` picks σ_t²:
        ``"beta"`` (σ_t² = β_t) or ``"beta_tilde"`` (σ_t² = β̃_t), Ho et al. Sec. 3.2.
        Returns a dict with ``mean``, ``var``, ``eps_hat`` and ``x0_hat``.
        """
        eps_hat = model(x_t, t)
        x0_hat = self.x0_from_eps(x_t, t, eps_hat)
        if clip_x0:
            x0_hat = x0_hat.clamp(-1.0, 1.0)
        mean, posterior_var = self.q_posterior(x0_hat, x_t, t)
        if variance == "beta":
            var = gather(self.beta, t, x_t)
        elif variance == "beta_tilde":
            var = posterior_var
        else:
            raise ValueError(f"variance must be 'beta' or 'beta_tilde', got {variance!r}")
        return {"mean": mean, "var": var, "eps_hat": eps_hat, "x0_hat": x0_hat}

    # ----- training objective -----------------------------------------------------------
    def sample_t(
        self, batch: int, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """t ~ Uniform{0, …, T-1}, shape (batch,)."""
        return torch.randint(0, self.T, (batch,), device=device, generator=generator)

    def loss_simple(
        self,
        model: EpsModel,
        x0: torch.Tensor,
        t: torch.Tensor | None = None,
        eps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """L_simple = E ‖ε - ε_θ(√ᾱ_t x_0 + √(1-ᾱ_t) ε, t)‖² per example (Algorithm 1), shape (B,).

        ``t`` and ``eps`` default to t ~ U{0..T-1} and ε ~ N(0, I).
        """
        if t is None:
            t = self.sample_t(x0.shape[0], x0.device)
        if eps is None:
            eps = torch.randn_like(x0)
        eps_hat = model(self.q_sample(x0, t, eps), t)
        return (eps - eps_hat).pow(2).flatten(1).mean(1)

    loss = loss_simple  # the training loss, by the name every process family uses

    def validation_times(self, k: int) -> torch.Tensor:
        """Up to k evenly spaced code indices in 0 … T-1."""
        return torch.linspace(0, self.T - 1, min(k, self.T)).round().long().unique()


def ddpm(schedule: Callable[[int], torch.Tensor], T: int) -> GaussianDiffusion:
    """DDPM's process from a β schedule (a ``_partial_`` schedule config) and T."""
    return GaussianDiffusion(schedule(T))
