"""Spacings for fast samplers: which of a process's T chain indices k ∈ {0, …, T-1} to visit
(DDPM's code indices; an SDE's evenly spaced chain times, diffusion.processes.kernel).

:func:`timesteps` returns ``steps`` distinct indices in *decreasing* order (the order a sampler
visits them); the sampler then jumps from the last one to the data. Kept apart from the solvers
(as k-diffusion does), so any chain sampler runs on any spacing:

- ``uniform``: DDIM's "uniform" (Song et al. 2021, App. C.2), t_i = ⌊i·T/S⌋ for i < S, so the
  first visited index is T - T/S, not T - 1 ("leading" spacing in diffusers).
- ``trailing``: t_i = round(T - i·T/S) - 1, which starts at T - 1 (Lin et al. 2024, Table 2).
- ``quadratic``: DDIM's "quadratic", t_i = ⌊(i·√(0.8 T)/(S-1))²⌋, dense near the data.
- ``logsnr``: uniform in λ = log(m / σ) (log(√ᾱ_t / √(1-ᾱ_t)) for DDPM) between λ_{T-1} and λ_0
  (DPM-Solver's ``logSNR`` skip type), rounded to the nearest index and made strictly increasing.
- ``karras``: Karras et al. 2022's σ steps (Eq. 5, ρ = 7) in σ̃ = σ / m = e^{-λ} between the
  chain's ends, each rounded to the index nearest in λ and made strictly increasing.
"""

from __future__ import annotations

import math

import torch

from diffusion.samplers.karras import karras_sigmas

SPACINGS = ("uniform", "trailing", "quadratic", "logsnr", "karras")
RHO = 7.0  #: the ``karras`` spacing's ρ


def timesteps(
    T: int, steps: int, spacing: str = "uniform", log_snr: torch.Tensor | None = None
) -> list[int]:
    """``steps`` chain indices in decreasing order; ``logsnr`` and ``karras`` need ``log_snr``,
    λ at each of the T indices (decreasing)."""
    if not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer in [1, T={T}], got {steps!r}")
    if spacing == "uniform":
        ts = [i * T // steps for i in range(steps)]
    elif spacing == "trailing":
        ts = [round(T - i * T / steps) - 1 for i in range(steps)]
    elif spacing == "quadratic":
        top = math.sqrt(0.8 * T)
        ts = [int((i * top / max(steps - 1, 1)) ** 2) for i in range(steps)]
    elif spacing in ("logsnr", "karras"):
        if log_snr is None:
            raise ValueError(f"spacing {spacing!r} needs the chain's log_snr")
        lam = log_snr.double()  # decreasing
        if spacing == "logsnr":
            targets = torch.linspace(float(lam[0]), float(lam[-1]), steps, dtype=torch.float64)
        else:  # λ = -log σ̃ of σ̃_i from σ̃_max down to σ̃_min
            sigmas = karras_sigmas(steps, math.exp(-lam[0]), math.exp(-lam[-1]), RHO)
            targets = -torch.log(torch.tensor(sigmas, dtype=torch.float64))
        ts = [int(torch.argmin((lam - x).abs())) for x in targets]
    else:
        raise ValueError(f"spacing must be one of {list(SPACINGS)}, got {spacing!r}")
    return _strictly_increasing(sorted(ts), T)[::-1]


def _strictly_increasing(ts: list[int], T: int) -> list[int]:
    """Push duplicates up (then, at the top, down) so that every index is distinct."""
    out: list[int] = []
    for t in ts:
        out.append(max(t, out[-1] + 1) if out else max(t, 0))
    for i in range(len(out) - 1, -1, -1):
        limit = T - 1 if i == len(out) - 1 else out[i + 1] - 1
        out[i] = min(out[i], limit)
    return out
