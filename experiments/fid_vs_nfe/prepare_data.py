"""Lay out the offline MNIST test split (../shared/data/mnist-t10k, 10k images) where
torchvision's MNIST loader looks for the training files, so `data=mnist` trains on it."""

import gzip
import shutil
import sys
from pathlib import Path

src = Path(sys.argv[1])  # .../shared/data/mnist-t10k
dst = Path(sys.argv[2]) / "MNIST" / "raw"
dst.mkdir(parents=True, exist_ok=True)
for kind in ("images-idx3", "labels-idx1"):
    with (
        gzip.open(src / f"t10k-{kind}-ubyte.gz") as f,
        open(dst / f"train-{kind}-ubyte", "wb") as g,
    ):
        shutil.copyfileobj(f, g)
print(f"wrote {dst}")
