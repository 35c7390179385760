"""Which samplers suit which family, and the two bridges between DDPM and the VP-SDE.

A DDPM model and a VP-SDE model are the same kind of object (an ε-network over a variance
preserving process), so each can use the other's samplers: :func:`as_ddpm` runs a VP-SDE model
on the SDE's own discrete chain with DDPM's samplers, :func:`as_vp_sde` runs a DDPM model with
the SDE samplers. Both query the network where the noise levels agree exactly (m² = ᾱ).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from diffusion.errors import ConfigError
from diffusion.process import GaussianDiffusion
from diffusion.sde import LABEL_SCALE, VPSDE

# Which sampler functions suit which process family: DDPM's samplers run a VP-SDE model on the
# SDE's own discrete chain (as_ddpm), the SDE samplers a DDPM model as a VP-SDE (as_vp_sde).
_DISCRETE = ("samplers.ddpm_ancestral", "samplers.ddim", "samplers.dpm_solver")
_SDE = ("score_samplers.euler_maruyama", "score_samplers.predictor_corrector",
        "score_samplers.probability_flow")  # fmt: skip
SAMPLERS_OF = {
    "GaussianDiffusion": _DISCRETE + _SDE,
    "VPSDE": _SDE + _DISCRETE,
    "SubVPSDE": _SDE,
    "VESDE": _SDE,
    "NCSN": ("score_samplers.annealed_langevin",),
}


def check_sampler(process: Any, sampler: Mapping) -> None:
    """Raise a ConfigError if the sampler config cannot sample ``process``'s family."""
    family = type(process).__name__
    target = str(sampler.get("_target_", "")).removeprefix("diffusion.")
    allowed = SAMPLERS_OF.get(family)
    if allowed is not None and target not in allowed:
        names = ", ".join(a.split(".")[-1].replace("ddpm_ancestral", "ddpm") for a in allowed)
        raise ConfigError(
            f"sampler {target.split('.')[-1]} cannot sample a {family} model; use one of "
            f"{names} (sampler=<name>, see conf/sampler/)"
        )


def as_ddpm(model: Any, sde: VPSDE, T: int) -> tuple[Any, GaussianDiffusion]:
    """A VP-SDE model as a DDPM one, on the SDE's own T-step chain (β_i = β(i / (T-1)) / T).

    Code index i is queried at the SDE time t_i with m(t_i)² = ᾱ_i exactly, so the network
    sees the noise level the chain is at (label 999 t_i)."""
    process = GaussianDiffusion(sde.discrete_beta(T))
    labels = LABEL_SCALE * sde.time_of(torch.cumprod(1.0 - process.beta64, 0))

    def eps_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model(x, labels.to(x.device)[t].to(x.dtype))

    return eps_model, process


def as_vp_sde(model: Any, process: GaussianDiffusion) -> tuple[Any, VPSDE]:
    """A DDPM model as a VP-SDE one: the VP-SDE with β(t) from T·β_0 to T·β_{T-1} (DDPM's
    linear schedule is its T-step chain); SDE time t is queried at the fractional step whose
    ᾱ equals m(t)², so the network sees the noise level it was trained at, for any schedule."""
    beta = process.beta64
    sde = VPSDE(beta_min=float(beta[0] * process.T), beta_max=float(beta[-1] * process.T))

    def eps_model(x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        m, _ = sde.marginal(label.double() / LABEL_SCALE)
        return model(x, process.fractional_step(m**2).to(x.dtype))

    return eps_model, sde
