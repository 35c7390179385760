"""The measured properties behind experiments/text_to_image's captions, on drawn strokes with a
known width and shear."""

from __future__ import annotations

import torch

from experiments.text_to_image import captions as C


def bar(width: int, shear: float = 0.0) -> torch.Tensor:
    """A 16-pixel vertical stroke of ``width`` columns on 28×28, x shifted by shear × height."""
    image = torch.zeros(1, 28, 28, dtype=torch.uint8)
    for row in range(6, 22):
        x = 12 + round(shear * (21 - row))  # leaning right as it goes up
        image[0, row, x : x + width] = 255
    return image


def test_thickness_slant_and_height_of_strokes():
    props = C.measure(torch.stack([bar(2), bar(4), bar(3, shear=0.5), bar(3)]))
    thickness, slant, height = props["thickness"], props["slant"], props["height"]
    assert thickness[1] > thickness[0] + 1.5  # 4 columns against 2 (2A/P ≈ w for long strokes)
    assert 3.0 < thickness[1] < 4.5
    assert abs(float(slant[3])) < 1e-6 and 0.4 < float(slant[2]) < 0.6  # the shear, control 0
    assert torch.equal(height, torch.full((4,), 16.0))


def test_captions_and_held_out_sentences_differ_in_form_only():
    assert C.caption(7, "thin", "slanted") == "a thin, slanted seven"
    assert C.caption(1, None, "upright") == "an upright one"
    assert C.held_out(8, "bold", "upright") == "an eight, upright and bold"
    assert C.caption(3, None, None) == "a three"
    held = C.held_out(7, "thin", "slanted")
    assert held == "a seven, slanted and thin" and held != C.caption(7, "thin", "slanted")
    captions, cuts = C.caption_dataset(torch.stack([bar(w) for w in (1, 2, 3, 4, 5, 6)]),
                                       torch.arange(6))  # fmt: skip
    assert captions[0].startswith("a thin") and captions[-1].startswith("a bold")
    assert cuts["thickness"][0] < cuts["thickness"][1]
