"""Tiny datasets written in the real on-disk formats, so the real loaders can be tested offline."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image


def blobs(n: int, size: int, channels: int, seed: int = 0) -> np.ndarray:
    """n uint8 images (n, size, size, channels): a bright square on a dark background."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 40, (n, size, size, channels), dtype=np.uint8)
    for img in images:
        r, c = rng.integers(0, size // 2, 2)
        img[r : r + size // 2, c : c + size // 2] = 220
    return images


def write_mnist(root: Path, folder: str = "MNIST", n: int = 64) -> Path:
    """``{root}/{folder}/raw/train-{images,labels}-idx*-ubyte``, IDX, uncompressed."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    images = blobs(n, 28, 1)[..., 0]
    (raw / "train-images-idx3-ubyte").write_bytes(
        struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes()
    )
    labels = np.arange(n, dtype=np.uint8) % 10
    (raw / "train-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())
    return raw


def write_cifar10(root: Path, per_batch: int = 10) -> Path:
    """``{root}/cifar-10-batches-py/data_batch_{1..5}``, pickled dicts as officially."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        images = blobs(per_batch, 32, 3, seed=i).transpose(0, 3, 1, 2).reshape(per_batch, -1)
        entry = {
            "data": images,
            "labels": [j % 10 for j in range(per_batch)],
            "batch_label": f"batch {i}",
        }
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(entry, f)
    return folder


def write_image_folder(root: Path, n: int = 12, corrupt: bool = True) -> Path:
    """PNGs and JPEGs of several sizes in nested folders, plus (optionally) one corrupt file."""
    for i, img in enumerate(blobs(n, 40, 3)):
        sub = root / f"class_{i % 3}" / "nested"
        sub.mkdir(parents=True, exist_ok=True)
        w = 40 + 8 * (i % 2)  # non-square: resized by the shorter side, then centre-cropped
        Image.fromarray(img).resize((w, 40)).save(sub / f"img_{i}.{'png' if i % 2 else 'jpg'}")
    if corrupt:
        (root / "class_0" / "broken.png").write_bytes(b"not an image at all")
    return root
