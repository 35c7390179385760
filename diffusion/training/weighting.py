"""Loss weightings: how much each time t counts in the training loss.

The loss of one example is w(t) ‖target - target̂‖² (per-dimension mean) in the space of the
prediction target (diffusion.processes.prediction). The papers state their weights relative to
L_simple's ε-MSE; since ‖ε - ε̂‖² = SNR ‖x_0 - x̂_0‖² and ‖v - v̂‖² = (m² + σ²)² / σ² ‖x_0 - x̂_0‖²
at fixed x_t, a weight w_ε on the ε-MSE is w_ε · SNR / c_target on the target's MSE, with
c_target = :meth:`~diffusion.processes.prediction.Target.mse_factor`:

=============  =========================  ===============================================
``simple``     1 on the target's own MSE  L_simple (Ho et al. 2020) for ε; plain MSE of x_0, v;
                                          EDM's λ(σ) ‖D - x_0‖² for F (Karras et al. 2022)
``min_snr``    w_ε = min(SNR, γ) / SNR    Hang et al. 2023: min(SNR, γ)/(SNR + 1) for v,
                                          min(SNR, γ) for x_0 (γ = 5)
``p2``         w_ε = 1 / (k + SNR)^γ      Choi et al. 2022 (k = 1, γ = 1)
``likelihood`` w_ε = g(t)² / σ(t)²        Song, Durkan et al. 2021 (λ = g², score SDEs)
``vlb``        the variational bound      Ho et al. 2020 Eq. 5: T · L_t in bits/dim
=============  =========================  ===============================================

Each weighting is one class here and one config in ``conf/loss_weight/``; ``needs`` names the view
of the process it requires (diffusion.processes.kernel), if any.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.resources import files

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffusion.processes.kernel import Process
from diffusion.processes.prediction import Target


@dataclass
class Batch:
    """One training batch as a weighting sees it: times t (B,), kernel (m, σ) broadcastable,
    data x_0, noisy x_t, the network's output ``raw`` in ``target`` and the target's MSE (B,)."""

    process: Process
    t: torch.Tensor
    m: torch.Tensor
    sigma: torch.Tensor
    x0: torch.Tensor
    x_t: torch.Tensor
    raw: torch.Tensor
    target: Target
    mse: torch.Tensor
    var_frac: torch.Tensor | None = None  #: a learned variance's interpolation weight, if any


class LossWeight(abc.ABC):
    """A weighting: the per-example loss from one batch."""

    name: str
    needs: str | None = None  #: a view the process must offer (diffusion.processes.kernel)
    bound: bool = False  #: the loss is the variational bound itself (it trains a learned σ²)

    @abc.abstractmethod
    def loss(self, batch: Batch) -> torch.Tensor:
        """The weighted loss per example, shape (B,)."""


class EpsWeighted(LossWeight):
    """A weight w_ε(t) relative to L_simple's ε-MSE, applied as w_ε · SNR / c_target to the
    target's MSE (module docstring)."""

    @abc.abstractmethod
    def eps_weight(self, batch: Batch) -> torch.Tensor:
        """w_ε(t) in float64, shaped like ``batch.m``."""

    def loss(self, batch: Batch) -> torch.Tensor:
        m, sigma = batch.m.double(), batch.sigma.double()
        weight = self.eps_weight(batch) * (m / sigma) ** 2 / batch.target.mse_factor(m, sigma)
        return batch.mse * weight.flatten().to(batch.mse.dtype)


class Simple(LossWeight):
    """1 on the target's own MSE: L_simple for ε (bitwise the loss of Ho et al.'s Algorithm 1),
    and for EDM's F exactly EDM's loss λ(σ) ‖D - x_0‖², λ = (σ² + σ_d²) / (σ σ_d)² (Eq. 8)."""

    name = "simple"

    def loss(self, batch: Batch) -> torch.Tensor:
        return batch.mse


class MinSNR(EpsWeighted):
    """min(SNR, γ) / SNR on the ε-MSE (Hang et al. 2023, "Min-SNR weighting")."""

    name = "min_snr"

    def __init__(self, gamma: float = 5.0) -> None:
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        self.gamma = gamma

    def eps_weight(self, batch: Batch) -> torch.Tensor:
        snr = (batch.m.double() / batch.sigma.double()) ** 2
        return snr.clamp(max=self.gamma) / snr


class P2(EpsWeighted):
    """1 / (k + SNR)^γ on the ε-MSE (Choi et al. 2022, "Perception Prioritized Training")."""

    name = "p2"

    def __init__(self, k: float = 1.0, gamma: float = 1.0) -> None:
        if not k > 0 or gamma < 0:
            raise ValueError(f"need k > 0 and gamma >= 0, got k={k}, gamma={gamma}")
        self.k, self.gamma = k, gamma

    def eps_weight(self, batch: Batch) -> torch.Tensor:
        snr = (batch.m.double() / batch.sigma.double()) ** 2
        return (self.k + snr) ** -self.gamma


class Likelihood(EpsWeighted):
    """λ(t) = g(t)² in denoising score matching, g² / σ² on the ε-MSE (Song, Durkan et al.
    2021: the weighting that bounds the negative log-likelihood)."""

    name = "likelihood"
    needs = "sde"

    def eps_weight(self, batch: Batch) -> torch.Tensor:
        _, g = batch.process.coefficients(batch.t)
        return g.double().reshape(batch.m.shape) ** 2 / batch.sigma.double() ** 2


class VLB(LossWeight):
    """The variational bound's own terms (Ho et al. 2020, Eq. 5): T · L_t in bits per dimension,
    L_t = KL(q(x_{t-1} | x_t, x_0) ‖ p_θ(x_{t-1} | x_t)) for t ≥ 1 and the discretised decoder
    NLL at t = 0, with p_θ's variance fixed to ``variance`` (β or β̃), or the learned one (then
    mean and variance are both trained by the bound: Nichol & Dhariwal's L_vlb). Its expectation
    over t is the bound on -log p(x_0) minus the prior term L_T (a constant)."""

    name = "vlb"
    needs = "vlb"
    bound = True

    def __init__(self, variance: str = "beta_tilde") -> None:
        if variance not in ("beta", "beta_tilde"):
            raise ValueError(f"variance must be 'beta' or 'beta_tilde', got {variance!r}")
        self.variance = variance

    def loss(self, batch: Batch) -> torch.Tensor:
        from diffusion.evaluation.likelihood import vlb_term

        process = batch.process
        _, x0_hat = batch.target.eps_x0(batch.raw, batch.x_t, batch.m, batch.sigma)
        log_var = process.model_log_var(batch.t, batch.x_t, self.variance, frac=batch.var_frac)
        return process.T * vlb_term(process, batch.x0, batch.x_t, batch.t, x0_hat, log_var)


def shipped() -> list[str]:
    """Names of the shipped weightings (conf/loss_weight/<name>.yaml)."""
    folder = files("diffusion.conf") / "loss_weight"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_loss_weight(config: Mapping | str | LossWeight) -> LossWeight:
    """A weighting from its name (a shipped config) or from a ``_target_`` node."""
    if isinstance(config, LossWeight):
        return config
    if isinstance(config, str):
        if config not in shipped():
            raise ValueError(f"loss_weight must be one of {shipped()}, got {config!r}")
        path = files("diffusion.conf") / "loss_weight" / f"{config}.yaml"
        config = OmegaConf.to_container(OmegaConf.create(path.read_text()))
    weight = instantiate(dict(config))
    if not isinstance(weight, LossWeight):
        raise ValueError(
            f"loss_weight._target_={config.get('_target_')!r} is not a loss weighting; choose "
            f"one of {shipped()}"
        )
    return weight
