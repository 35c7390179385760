"""Captions for MNIST digits from their label and measured properties: "a thin, slanted seven".

Measured on the ink (pixels above half intensity) of each 28×28 image:
  - thickness: the mean stroke width, 2 A / P for ink area A and boundary P (ink pixels with a
    blank 4-neighbour): a stroke of width w and length L has A ≈ w L and P ≈ 2 L;
  - slant: the shear of the ink, cov(x, y) / var(y) with y pointing up, so a digit leaning right
    is positive (the deskewing statistic of MNIST's classic preprocessing);
  - height: the rows the ink spans.
A caption names the digit and the property words of the image's tertiles: thickness "thin"
(lowest third) or "bold" (highest), slant "upright" (|slant| in the lowest third) or "slanted"
(leaning right, highest third); an image in neither end of a property gets no word for it.

Training captions are written one way (:func:`caption`: "a thin, slanted seven"); the prompts
the experiment measures are held out as sentences (:func:`held_out`: "a seven, slanted and
thin"): the same facts in a word order never seen in training.
"""

from __future__ import annotations

import torch

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
THICKNESS = ("thin", "bold")
SLANT = ("upright", "slanted")


def measure(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """thickness, slant and height of uint8 images (N, 1, H, W), each (N,) float."""
    ink = images[:, 0] > 127  # (N, H, W)
    padded = torch.nn.functional.pad(ink, (1, 1, 1, 1))
    inner = (padded[:, :-2, 1:-1] & padded[:, 2:, 1:-1] & padded[:, 1:-1, :-2]
             & padded[:, 1:-1, 2:])  # fmt: skip
    area = ink.sum((1, 2)).float()
    boundary = (ink & ~inner).sum((1, 2)).float()
    thickness = 2 * area / boundary.clamp(min=1)
    H, W = ink.shape[1:]
    y = -torch.arange(H, dtype=torch.float32)[:, None].expand(H, W)  # up is positive
    x = torch.arange(W, dtype=torch.float32)[None, :].expand(H, W)
    weight = ink.float()
    total = weight.sum((1, 2)).clamp(min=1)
    mx, my = (weight * x).sum((1, 2)) / total, (weight * y).sum((1, 2)) / total
    cov = (weight * (x - mx[:, None, None]) * (y - my[:, None, None])).sum((1, 2)) / total
    var = (weight * (y - my[:, None, None]) ** 2).sum((1, 2)) / total
    slant = cov / var.clamp(min=1e-6)
    rows = ink.any(dim=2)
    first = rows.float().argmax(dim=1)
    last = H - 1 - rows.flip(1).float().argmax(dim=1)
    height = torch.where(rows.any(dim=1), (last - first + 1).float(), torch.zeros(len(ink)))
    return {"thickness": thickness, "slant": slant, "height": height}


def tertiles(values: torch.Tensor) -> tuple[float, float]:
    q = torch.quantile(values.float(), torch.tensor([1 / 3, 2 / 3]))
    return float(q[0]), float(q[1])


def words(properties: dict[str, torch.Tensor], cuts: dict[str, tuple[float, float]]) -> list[tuple]:
    """(thickness word or None, slant word or None) of each image, from the dataset's cuts."""
    out = []
    thin, bold = cuts["thickness"]
    for thick, slant in zip(properties["thickness"].tolist(), properties["slant"].tolist(),
                            strict=True):  # fmt: skip
        t = "thin" if thick <= thin else "bold" if thick >= bold else None
        s = ("upright" if abs(slant) <= cuts["abs_slant"][0] else
             "slanted" if slant >= cuts["slant"][1] else None)  # fmt: skip
        out.append((t, s))
    return out


def article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def caption(label: int, thickness: str | None, slant: str | None) -> str:
    """The training sentence: "a thin, slanted seven", "an upright eight", "a seven"."""
    return article(" ".join([", ".join(w for w in (thickness, slant) if w), DIGITS[label]]).strip())


def held_out(label: int, thickness: str, slant: str) -> str:
    """The same facts in a sentence form that no training caption has."""
    return f"{article(DIGITS[label])}, {slant} and {thickness}"


def caption_dataset(images: torch.Tensor, labels: torch.Tensor) -> tuple[list[str], dict]:
    """The caption of each image and the property cuts (tertiles) they were written with."""
    props = measure(images)
    cuts = {"thickness": tertiles(props["thickness"]), "slant": tertiles(props["slant"]),
            "abs_slant": tertiles(props["slant"].abs())}  # fmt: skip
    texts = [caption(int(c), t, s) for c, (t, s) in zip(labels, words(props, cuts), strict=True)]
    return texts, cuts
