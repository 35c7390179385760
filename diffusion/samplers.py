"""Samplers: free functions with one shared signature.

    sampler(model, x_T, process, *, generator=None, callback=None, **options) -> x_0

``model`` is an ε-predictor ``model(x_t, t)``, ``x_T`` the initial noise (B, C, H, W),
``process`` a :class:`~diffusion.process.GaussianDiffusion`, ``generator`` the source of the
sampler's own noise (so a seed fixes the whole chain), and ``callback`` receives a
:class:`Step` after every network evaluation (for trajectories and progress bars).
A sampler config in ``conf/sampler/`` names the function with ``_partial_: true`` and fixes
its options. Every sampler counts its network evaluations (NFE) in ``Step.nfe``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from diffusion.process import EpsModel, GaussianDiffusion


@dataclass
class Step:
    """State handed to a sampler's callback after each network evaluation."""

    t: int  #: code index of x_t that was just denoised (see diffusion.process)
    x_t: torch.Tensor  #: the sample the network saw
    x_next: torch.Tensor  #: the sample after this step (x_{t-1}; x_0 at the last step)
    x0_hat: torch.Tensor  #: the network's prediction of x_0
    nfe: int  #: network evaluations so far


Callback = Callable[[Step], None]


@torch.no_grad()
def ddpm_ancestral(
    model: EpsModel,
    x_T: torch.Tensor,
    process: GaussianDiffusion,
    *,
    variance: str = "beta",
    clip_x0: bool = True,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Ancestral sampling, Ho et al. 2020 Algorithm 2.

    For t = T-1, …, 0 (code indices): x_{t-1} = μ̃_t(x_t, x̂_0) + σ_t z, z ~ N(0, I), with
    σ_t² = β_t (``variance="beta"``) or β̃_t (``"beta_tilde"``), and no noise at the last step
    (t = 0), which returns the mean. ``clip_x0`` clips x̂_0 to [-1, 1] before forming the mean
    (what DDPM's released sampler does); with it off the mean is Algorithm 2's exactly.
    """
    x = x_T
    batch = x.shape[0]
    for i, step in enumerate(reversed(range(process.T))):
        t = torch.full((batch,), step, device=x.device, dtype=torch.long)
        out = process.p_mean_var(model, x, t, variance=variance, clip_x0=clip_x0)
        if step > 0:
            z = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
            x_next = out["mean"] + out["var"].sqrt() * z
        else:
            x_next = out["mean"]
        if callback is not None:
            callback(Step(t=step, x_t=x, x_next=x_next, x0_hat=out["x0_hat"], nfe=i + 1))
        x = x_next
    return x
