"""Classifier-free guidance (Ho & Salimans 2022) as one more wrapper of the network.

A class-conditional network also learns the unconditional model through a null class ∅ (labels
dropped to ∅ in training with probability p_uncond). Sampling with guidance strength w uses

    ε̃(x_t, c) = (1 + w) ε̂(x_t, c) - w ε̂(x_t, ∅),

w = 0 being the plain conditional model. diffusers writes the same rule as
ε̂_∅ + s (ε̂_c - ε̂_∅) with ``guidance_scale`` s = 1 + w (its s = 1 is our w = 0).

Every prediction target reads the network's output affinely at a fixed x_t (ε̂ = a x_t + b raw,
diffusion.processes.prediction), and (1 + w) - w = 1, so combining the raw outputs this way is
the same as combining the ε̂'s: :class:`Guided` wraps the network, below the Predictor, and every
sampler, target and family is guided without a branch. Both halves run in one batched forward
pass. With a learned variance only the mean channels are combined; the variance is the
conditional model's (as GLIDE does).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ConditionalNetwork = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
"""``raw = net(input, label, y)``: y the classes (B,) or a prompt's token ids (B, L), None for
the null condition ∅."""


class Guided:
    """``raw = guided(input, label)``: the conditional network at ``labels``, guided by ``w``.

    Args:
        net: a class-conditional network ``net(input, label, y)``.
        labels: the condition of each example in the batches it will see: classes (B,) or token
            ids (B, L); None draws from the unconditional model (∅).
        guidance: w >= 0; 0 is the conditional model itself (one forward pass, bitwise).
        null: ∅ as the network takes it: the null class K, or a condition row (the empty
            prompt's token ids, (L,)) broadcast against ``labels``.
        mean_channels: with a learned variance, the channels of the mean (the first ones);
            None when every output channel is the mean.
    """

    def __init__(
        self,
        net: ConditionalNetwork,
        labels: torch.Tensor | None,
        guidance: float,
        null: int | torch.Tensor,
        mean_channels: int | None = None,
    ) -> None:
        if not guidance >= 0:
            raise ValueError(f"guidance must be >= 0, got {guidance}")
        if guidance > 0 and labels is None:
            raise ValueError("guidance needs labels: an unconditional draw (∅) is not guided")
        self.net, self.labels, self.guidance = net, labels, float(guidance)
        self.null, self.mean_channels = null, mean_channels

    def __call__(self, inputs: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        labels = None if self.labels is None else self.labels.to(inputs.device)
        if self.guidance == 0:
            return self.net(inputs, label, labels)
        null = torch.as_tensor(self.null, device=labels.device).expand_as(labels)
        both = self.net(torch.cat([inputs, inputs]), torch.cat([label, label]),
                        torch.cat([labels, null]))  # fmt: skip
        cond, uncond = both.chunk(2)
        w = self.guidance
        if self.mean_channels is None:
            return (1 + w) * cond - w * uncond
        c = self.mean_channels
        return torch.cat([(1 + w) * cond[:, :c] - w * uncond[:, :c], cond[:, c:]], dim=1)
