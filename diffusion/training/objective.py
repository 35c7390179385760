"""The training objective of every family: one function of the kernel, the prediction target
and the loss weighting (Ho et al. 2020 Algorithm 1; denoising score matching, Song et al. 2021).

    t ~ the process's training times, ε ~ N(0, I), x_t = m(t) x_0 + σ(t) ε,
    raw = net(x_t, label(t)),  loss = weighting(‖target(x_0, ε) - raw‖²)

With ``learn_sigma`` (Nichol & Dhariwal 2021, Sec. 3.1) the network's second half of channels
is v, the variance's interpolation weight, and the loss is L_hybrid = L + λ L_vlb (or, with
``loss_weight=vlb``, the bound alone, which then trains mean and variance: their L_vlb), with
L_vlb = T · L_t (bits/dim; diffusion.evaluation.likelihood.vlb_term) of a model whose mean is
held fixed (stop-gradient through the first half) and whose variance is learned. λ = 0.001,
improved-diffusion's ``vb · T / 1000``.
"""

from __future__ import annotations

import torch

from diffusion.errors import ConfigError
from diffusion.processes.kernel import Process, per_example
from diffusion.processes.prediction import Network, Target, make_target, network_input
from diffusion.training.weighting import Batch, LossWeight, Simple

T_SAMPLINGS = ("uniform", "loss_aware")


def check_fits(
    process: Process, weight: LossWeight, learn_sigma: bool, t_sampling: str = "uniform"
) -> None:
    """A ConfigError if the weighting, a learned variance or the time sampling needs a view the
    process lacks."""
    if t_sampling not in T_SAMPLINGS:
        raise ConfigError(
            f"module.t_sampling={t_sampling!r} is invalid: choose one of {list(T_SAMPLINGS)}"
        )
    if t_sampling == "loss_aware" and "vlb" not in process.offers:
        raise ConfigError(
            f"module.t_sampling=loss_aware samples DDPM's discrete steps (process=ddpm); "
            f"process={process.family} has none"
        )
    if weight.needs is not None and weight.needs not in process.offers:
        raise ConfigError(
            f"loss_weight={weight.name} needs the process's {weight.needs} view; "
            f"process={process.family} offers {sorted(process.offers)}"
        )
    if learn_sigma and "vlb" not in process.offers:
        raise ConfigError(
            f"module.learn_sigma=true needs a process with a discrete variational bound "
            f"(process=ddpm); process={process.family} has none"
        )


class Objective:
    """Per-example training loss ``objective(net, x0, t=None, eps=None) -> (B,)``.

    Args:
        process: the kernel, label and training times (diffusion.processes).
        target: what the network predicts: a Target or its name (``eps``, ``x0``, ``v``,
            ``edm``; diffusion.processes.prediction).
        weight: the loss weighting (diffusion.training.weighting); default L_simple.
        learn_sigma: the network also predicts its variance (DDPM; adds λ L_vlb).
        vlb_weight: λ of L_hybrid.
    """

    def __init__(
        self,
        process: Process,
        target: str | Target = "eps",
        weight: LossWeight | None = None,
        learn_sigma: bool = False,
        vlb_weight: float = 0.001,
    ) -> None:
        self.process, self.target = process, make_target(target)
        self.weight = weight or Simple()
        self.learn_sigma, self.vlb_weight = learn_sigma, vlb_weight

    def __call__(
        self,
        net: Network,
        x0: torch.Tensor,
        t: torch.Tensor | None = None,
        eps: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss of each example of ``x0`` (B, ...), shape (B,); ``t`` and ``eps`` default to
        the process's training times and N(0, I) (drawn in that order); ``y``, the classes of a
        class-conditional network (``net(input, label, y)``)."""
        process = self.process
        if t is None:
            t = process.sample_t(x0.shape[0], x0.device)
        if eps is None:
            eps = torch.randn_like(x0)
        m, sigma = process.marginal(t)
        m, sigma = per_example(m, x0), per_example(sigma, x0)
        x_t = m * x0 + sigma * eps
        inputs = network_input(self.target, x_t, m, sigma)
        raw = net(inputs, process.label(t)) if y is None else net(inputs, process.label(t), y)
        v = None
        if self.learn_sigma:
            raw, v = raw.chunk(2, dim=1)
        mse = (self.target.value(x0, eps, m, sigma) - raw).pow(2).flatten(1).mean(1)
        frac = None if v is None else (v + 1) / 2
        batch = Batch(process, t, m, sigma, x0, x_t, raw, self.target, mse, frac)
        loss = self.weight.loss(batch)
        if v is not None and not self.weight.bound:  # L_hybrid; the bound itself trains σ² already
            loss = loss + self.vlb_weight * self.vlb(x0, x_t, t, m, sigma, raw.detach(), v)
        return loss

    def vlb(self, x0, x_t, t, m, sigma, raw, v) -> torch.Tensor:
        """T · L_t (bits/dim) of the learned variance with the mean from ``raw`` held fixed."""
        from diffusion.evaluation.likelihood import vlb_term

        _, x0_hat = self.target.eps_x0(raw, x_t, m, sigma)
        log_var = self.process.model_log_var(t, x_t, "beta", frac=(v + 1) / 2)
        return self.process.T * vlb_term(self.process, x0, x_t, t, x0_hat, log_var)
