"""The Gaussian diffusion process of DDPM (Ho et al. 2020), as a module of constant buffers.

Time convention (used everywhere in this package): **t counts from 0**. Code index
t ∈ {0, …, T-1} is the paper's step t + 1, so ``x_t`` in code is the paper's x_{t+1}, the
data x_0 sits "before" index 0 (at t = -1), and

    alpha_bar[t]      = ∏_{i ≤ t} (1 - beta[i])        (paper ᾱ_{t+1})
    alpha_bar_prev[t] = alpha_bar[t - 1], with alpha_bar_prev[0] = 1 (paper ᾱ_t, ᾱ_0 = 1).

The kernel (diffusion.processes.kernel) is m = √ᾱ_t, σ = √(1 - ᾱ_t), and the network's label is
the index itself. Between indices, log ᾱ is interpolated linearly (with log ᾱ = 0 at t = -1),
which makes DDPM a process in continuous time too: its SDE view is the VP-SDE
dx = -½ b(t) x dt + √b(t) dw with b(t) = -d log ᾱ / dt, piecewise constant (b ≈ β_t on
[t - 1, t]), exact for any schedule; so every sampler runs on it.

Constants are computed once in float64 and stored as float32 buffers (float32 keeps the module
movable to any device); training gathers them per batch with :func:`gather`, the samplers use the
float64 kernel. Shapes: images are (B, C, H, W) or any (B, ...); ``t`` is a tensor of shape (B,).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from diffusion.processes.kernel import Process, SDEView
from diffusion.processes.schedules import validate_beta


def gather(constant: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``constant[t]`` reshaped to (B, 1, 1, ...) to broadcast against ``like``, in its dtype."""
    out = constant.to(like.device)[t].to(like.dtype)
    return out.reshape(t.shape[0], *([1] * (like.ndim - 1)))


class GaussianDiffusion(nn.Module, Process, SDEView):
    """Forward process q, posterior q(x_{t-1} | x_t, x_0), and the kernel at any t ∈ [-1, T-1].

    Args:
        beta: the schedule β, shape (T,), any float dtype (converted to float64 first).
    """

    family = "ddpm"
    offers = frozenset({"chain", "sde", "vlb"})

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
            "posterior_var": posterior_var,
            "posterior_log_var_clipped": posterior_log_var_clipped,
            # μ̃_t(x_t, x_0) = coef_x0 · x_0 + coef_xt · x_t (Ho et al. Eq. 7)
            "posterior_coef_x0": beta * alpha_bar_prev.sqrt() / (1.0 - alpha_bar),
            "posterior_coef_xt": (1.0 - alpha_bar_prev) * alpha.sqrt() / (1.0 - alpha_bar),
        }
        for name, value in constants.items():
            self.register_buffer(name, value.float(), persistent=name == "beta")
        self.T = T
        self.t_min, self.t_max = 0.0, float(T - 1)
        # log ᾱ at t = -1, 0, …, T-1 (float64, CPU): the kernel between indices
        self._log_alpha_bar64 = torch.cat([beta.new_zeros(1), torch.log(alpha_bar)])
        self._beta64 = beta  # exact schedule, saved with checkpoints by the LightningModule

    @property
    def beta64(self) -> torch.Tensor:
        """The schedule exactly as computed, float64 on the CPU."""
        return self._beta64

    # ----- the kernel ---------------------------------------------------------------------
    def log_alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """log ᾱ at (fractional) steps ``t`` ∈ [-1, T-1], linear between indices, float64."""
        table = self._log_alpha_bar64.to(t.device)
        u = t.double().clamp(-1, self.T - 1) + 1  # position in the table
        low = u.floor().long().clamp(max=self.T - 1)
        frac = u - low
        high = (low + 1).clamp(max=self.T)
        return (1 - frac) * table[low] + frac * table[high]

    def marginal(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(√ᾱ_t, √(1-ᾱ_t)): integer ``t`` gathers the float32 buffers (training); floating-point
        ``t`` gives the interpolated kernel in float64 (samplers)."""
        if not t.is_floating_point():
            return (
                self.sqrt_alpha_bar.to(t.device)[t],
                self.sqrt_one_minus_alpha_bar.to(t.device)[t],
            )
        log_alpha_bar = self.log_alpha_bar(t)
        return torch.exp(0.5 * log_alpha_bar), (-torch.expm1(log_alpha_bar)).sqrt()

    def label(self, t: torch.Tensor) -> torch.Tensor:
        """The network sees the (fractional) code index itself."""
        return t

    def moments_at_label(self, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.marginal(label)

    def time_text(self, t: float) -> str:
        """The paper's step t + 1 (fractional between indices, as EDM's samplers visit)."""
        return f"t={t + 1:.5g}"

    def fractional_step(self, alpha_bar: torch.Tensor) -> torch.Tensor:
        """The (fractional) step whose ᾱ is ``alpha_bar``, interpolating log ᾱ; clamped to
        [0, T-1]. The inverse of :meth:`marginal` on floats."""
        neg_log = -self._log_alpha_bar64[1:].to(alpha_bar.device)
        if self.T == 1:
            return torch.zeros_like(alpha_bar, dtype=torch.float64)
        y = -torch.log(alpha_bar.double())
        high = torch.searchsorted(neg_log, y).clamp(1, self.T - 1)
        low = high - 1
        frac = ((y - neg_log[low]) / (neg_log[high] - neg_log[low])).clamp(0, 1)
        return (low + frac).clamp(0, self.T - 1)

    def sample_t(
        self, n: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """t ~ Uniform{0, …, T-1}, shape (n,)."""
        return torch.randint(0, self.T, (n,), device=device, generator=generator)

    def validation_times(self, k: int) -> torch.Tensor:
        """Up to k evenly spaced code indices in 0 … T-1."""
        return torch.linspace(0, self.T - 1, min(k, self.T)).round().long().unique()

    # ----- the "sde" view -----------------------------------------------------------------
    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f = -½ b(t), g = √b(t), with b = -d log ᾱ / dt on the interval ``t`` lies in."""
        table = self._log_alpha_bar64.to(t.device)
        u = t.double().clamp(-1, self.T - 1) + 1
        low = torch.minimum(u.ceil().long() - 1, torch.full_like(u, self.T - 1, dtype=torch.long))
        b = table[low.clamp(min=0)] - table[low.clamp(min=0) + 1]
        return -0.5 * b, b.sqrt()

    def time_at(self, sigma_tilde: torch.Tensor) -> torch.Tensor:
        """The (fractional) step with √((1 - ᾱ) / ᾱ) = σ̃, i.e. ᾱ = 1 / (1 + σ̃²)."""
        return self.fractional_step(1.0 / (1.0 + sigma_tilde.double() ** 2))

    def discretize(self, t: torch.Tensor, dt: float) -> tuple[torch.Tensor, torch.Tensor]:
        """DDPM's own step from t - dt to t: a = √(ᾱ_t / ᾱ_{t-dt}), G² = 1 - a²."""
        delta = self.log_alpha_bar(t) - self.log_alpha_bar(t - dt)
        return torch.exp(0.5 * delta), (-torch.expm1(delta)).sqrt()

    # ----- forward process (Ho et al. 2020) -----------------------------------------------
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

    def q_posterior(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean μ̃_t(x_t, x_0) and variance β̃_t of q(x_{t-1} | x_t, x_0) (Ho et al. Eqs. 6-7)."""
        mean = (
            gather(self.posterior_coef_x0, t, x_t) * x0
            + gather(self.posterior_coef_xt, t, x_t) * x_t
        )
        return mean, gather(self.posterior_var, t, x_t)

    def model_log_var(
        self, t: torch.Tensor, like: torch.Tensor, variance: str, frac: torch.Tensor | None = None
    ) -> torch.Tensor:
        """log σ_t² of p_θ(x_{t-1} | x_t): ``"beta"`` (log β_t), ``"beta_tilde"`` (log β̃_t,
        clipped at t = 0), or learned, ``frac`` · log β_t + (1 - frac) · log β̃_t (Nichol &
        Dhariwal 2021, Eq. 15, with frac = (v + 1) / 2). At t = 0 every choice uses β̃ at t = 1
        in place of β̃_0 = 0, as improved-diffusion does; shaped to broadcast against ``like``."""
        min_log = gather(self.posterior_log_var_clipped, t, like)
        max_log = gather(torch.log(self.beta), t, like)
        if frac is not None:
            return frac * max_log + (1 - frac) * min_log
        if variance == "beta_tilde":
            return min_log
        if variance == "beta":  # β_0 at t = 0 would be the decoder's variance; keep β̃_1 there
            return torch.where(t.reshape(min_log.shape) == 0, min_log, max_log)
        raise ValueError(f"variance must be 'beta' or 'beta_tilde', got {variance!r}")


def ddpm(schedule: Callable[[int], torch.Tensor], T: int) -> GaussianDiffusion:
    """DDPM's process from a β schedule (a ``_partial_`` schedule config) and T."""
    return GaussianDiffusion(schedule(T))
