"""Importance sampling of the training time t (Nichol & Dhariwal 2021, Sec. 3.3).

The variational bound's terms L_t differ by orders of magnitude across t, so a uniform t makes
L_vlb a noisy estimate. Sampling t with p_t ∝ √E[L_t²] and weighting each loss by 1 / (T p_t)
keeps the estimate unbiased, E_p[L_t / (T p_t)] = (1/T) Σ_t L_t, and lowers its variance.
E[L_t²] is estimated from the last ``history`` losses seen at each t; until every t has that
many, t stays uniform; a small ``uniform_prob`` keeps every t reachable (improved-diffusion's
``LossSecondMomentResampler``, 10 losses and 0.001). The history is a pair of buffers, so it is
in the checkpoint and a resumed run samples as the uninterrupted one.
"""

from __future__ import annotations

import torch
from torch import nn


class LossAwareTimes(nn.Module):
    """p_t ∝ √E[L_t²] over the T code indices of a discrete process."""

    def __init__(self, T: int, history: int = 10, uniform_prob: float = 0.001) -> None:
        super().__init__()
        if history < 1 or not 0.0 <= uniform_prob <= 1.0:
            raise ValueError(f"need history >= 1 and uniform_prob in [0, 1], got {history}, "
                             f"{uniform_prob}")  # fmt: skip
        self.T, self.uniform_prob = T, uniform_prob
        self.register_buffer("losses", torch.zeros(T, history, dtype=torch.float64))
        self.register_buffer("count", torch.zeros(T, dtype=torch.long))

    def probabilities(self) -> torch.Tensor:
        """p_t, shape (T,), float64: uniform until every t has a full history."""
        if (self.count < self.losses.shape[1]).any():
            return torch.full((self.T,), 1.0 / self.T, dtype=torch.float64)
        weight = self.losses.pow(2).mean(1).sqrt()
        weight = weight / weight.sum()
        return weight * (1 - self.uniform_prob) + self.uniform_prob / self.T

    def sample(self, n: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """t ~ p, shape (n,), and the weights 1 / (T p_t) that keep the loss unbiased."""
        p = self.probabilities()
        t = torch.multinomial(p, n, replacement=True)
        return t.to(device), (1.0 / (self.T * p[t])).float().to(device)

    @torch.no_grad()
    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Add the (unweighted) losses seen at times ``t``, newest last."""
        for step, loss in zip(t.long().tolist(), losses.double().cpu().tolist(), strict=True):
            full = int(self.count[step]) == self.losses.shape[1]
            if full:
                self.losses[step] = torch.roll(self.losses[step], -1)
                self.losses[step, -1] = loss
            else:
                self.losses[step, self.count[step]] = loss
                self.count[step] += 1
