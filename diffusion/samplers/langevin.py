"""Annealed Langevin dynamics (Song & Ermon 2019), on a process's noise levels (NCSN's)."""

from __future__ import annotations

import torch

from diffusion.processes.kernel import Process, batch_of
from diffusion.processes.prediction import Predictor
from diffusion.samplers.base import Callback, Step, needs, noise


@needs("levels")
@torch.no_grad()
def annealed_langevin(
    model: Predictor,
    x_T: torch.Tensor,
    process: Process,
    *,
    steps_per_level: int = 100,
    step_size: float = 2e-5,
    denoise: bool = True,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1).

    For the levels σ_1 > … > σ_L (times t = L-1 … 0), with α_i = ε σ_i² / σ_L² (``step_size`` =
    ε): ``steps_per_level`` steps x ← x + (α_i / 2) s(x, σ_i) + √α_i z. Starts from N(0, σ_1² I);
    ``denoise`` adds the final step x ← x + σ_L² s(x, σ_L), Tweedie's x̂_0 (Jolicoeur-Martineau
    et al. 2021, NCSNv2's default). NFE = L · steps_per_level (+ 1).
    """
    x = x_T * process.prior_std
    levels = torch.arange(process.T - 1, -1, -1, dtype=torch.float64)  # noisiest first
    sigmas = process.marginal(levels)[1].tolist()
    sigma_last, last = sigmas[-1], float(levels[-1])
    nfe = 0
    for t, sigma in zip(levels.tolist(), sigmas, strict=True):
        alpha = step_size * (sigma / sigma_last) ** 2
        for _ in range(steps_per_level):
            pred = model(x, batch_of(t, x))
            x_next = x + 0.5 * alpha * pred.score + alpha**0.5 * noise(x, generator)
            nfe += 1
            if callback is not None:
                callback(Step(t, x, x_next, pred.x0_hat, nfe=nfe))
            x = x_next
    if denoise:
        x0 = model(x, batch_of(last, x)).x0_hat
        nfe += 1
        if callback is not None:
            callback(Step(last, x, x0, x0, nfe=nfe))
        x = x0
    return x
