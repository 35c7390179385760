"""Drawing many samples from a model in batches, for the sampling entry point, the evaluation
and the FID callback."""

from __future__ import annotations

import torch
from tqdm import tqdm

from diffusion.evaluation.plots import TrajectoryRecorder
from diffusion.samplers.base import Step


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats (N, C, H, W) -> uint8 [0, 255], same layout."""
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


class NFECounter:
    """Sampler callback: counts network evaluations and advances a progress bar."""

    def __init__(self, bar: tqdm | None = None, then=None) -> None:
        self.nfe = 0
        self.bar = bar
        self.then = then

    def __call__(self, step: Step) -> None:
        self.nfe = step.nfe
        if self.bar is not None:
            self.bar.set_postfix(nfe=step.nfe, refresh=False)
        if self.then is not None:
            self.then(step)


def draw(
    module,
    n: int,
    batch_size: int,
    seed: int,
    sampler,
    use_ema: bool = True,
    strip: TrajectoryRecorder | None = None,
    progress: bool = True,
    labels: torch.Tensor | None = None,
    guidance: float = 0.0,
    prompts: list[str] | None = None,
) -> tuple[torch.Tensor, int]:
    """``n`` samples in [-1, 1] on the CPU from a DiffusionModule, in batches, from one seed;
    returns them and the NFE per sample. ``strip`` records the trajectory of the first batch.
    A class-conditional model draws sample i of class ``labels[i]``, a text-conditional one for
    ``prompts[i]``, with guidance w."""
    generator = torch.Generator().manual_seed(seed)
    batches, nfe = [], 0
    sizes = [min(batch_size, n - i) for i in range(0, n, batch_size)]
    bar = tqdm(sizes, desc="sampling", unit="batch", disable=not progress)
    start = 0
    for i, size in enumerate(bar):
        counter = NFECounter(bar, then=strip if i == 0 else None)
        mine = None if labels is None else labels[start : start + size]
        my_prompts = None if prompts is None else prompts[start : start + size]
        start += size
        batches.append(
            module.sample(size, generator=generator, use_ema=use_ema, callback=counter,
                          sampler=sampler, labels=mine, guidance=guidance,
                          prompts=my_prompts).cpu()
        )  # fmt: skip
        nfe = counter.nfe
    return torch.cat(batches), nfe


def balanced_labels(n: int, num_classes: int, grouped: bool = False) -> torch.Tensor | None:
    """Labels for ``n`` samples of a class-conditional model, as equal in number per class as
    ``n`` allows: 0, 1, …, K-1, 0, 1, … or, ``grouped``, class-major (0, 0, …, 1, 1, …) for a
    grid with one row per class. None for an unconditional model (num_classes = 0)."""
    if not num_classes:
        return None
    labels = torch.arange(n) % num_classes
    return labels.sort(stable=True).values if grouped else labels
