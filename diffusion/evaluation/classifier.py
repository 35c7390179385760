"""Class accuracy of conditional samples: the share of samples that a classifier, trained on the
data's training split, assigns to the class they were drawn for (the "classification accuracy"
of class-conditional diffusion papers, with a small CNN of ours in place of a pretrained one).

The classifier is trained once per dataset and resolution (Adam, a fixed seed) and cached in
``cache_dir`` with its accuracy on the data's validation split, which is reported beside every
class accuracy: a sample accuracy can only be read against the classifier's own.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from diffusion.evaluation.metrics import cached_entry
from diffusion.training.data import to_model_range


class SmallClassifier(nn.Module):
    """Two conv blocks and a linear head: images in [-1, 1] (B, C, H, W) -> logits (B, K)."""

    def __init__(self, channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
        )  # fmt: skip
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * width, 128), nn.ReLU(), nn.Linear(128, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def fit(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    epochs: int = 3,
    batch_size: int = 128,
    seed: int = 0,
) -> SmallClassifier:
    """A classifier trained on uint8 ``images`` (N, C, H, W) and their ``labels``."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = SmallClassifier(images.shape[1], num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = to_model_range(images), labels.long()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for batch in order.split(batch_size):
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """The class of each uint8 image (N,)."""
    x = to_model_range(images)
    return torch.cat([model(chunk).argmax(1) for chunk in x.split(batch_size)])


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of ``images`` (uint8) classified as ``labels``."""
    return float((predict(model, images) == labels.cpu()).float().mean())


Split = Callable[[], tuple[torch.Tensor, torch.Tensor]]
"""Loads (uint8 images, labels) of one split when called."""


def cached_classifier(
    key: str, train: Split, test: Split, channels: int, num_classes: int, cache_dir: str | Path
) -> tuple[SmallClassifier, float]:
    """The classifier of ``key`` (dataset, resolution) and its test accuracy: trained on the
    ``train`` split and measured on ``test`` the first time (each loaded only then), then read
    from ``cache_dir`` (plain tensors, loaded without running code)."""
    def compute() -> dict:
        model = fit(*train(), num_classes)
        return {"state_dict": model.state_dict(), "test_accuracy": accuracy(model, *test())}

    entry = cached_entry(key, "classifier", compute, cache_dir)
    model = SmallClassifier(channels, num_classes)
    model.load_state_dict(entry["state_dict"])
    return model.eval(), float(entry["test_accuracy"])
