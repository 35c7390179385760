"""Image data modules. Each yields batches of uint8 images (B, C, H, W), or (images, labels) for
a class-conditional model (``labels = True``, set by ``diffusion.train`` when the model has
classes), or (images, captions) for a text-conditional one (``captions = True``); the scaling
to [-1, 1] and the random horizontal flip happen on the batch, on its
device, in :meth:`ImageDataModule.on_after_batch_transfer`. :meth:`ImageDataModule.class_names`
names the classes (cheaply, before any loading), None for data without labels;
:meth:`ImageDataModule.has_captions` says whether the data has captions.

``digits`` (scikit-learn's 1,797 bundled 8×8 digits, offline), ``mnist``, ``fashion_mnist`` and
``cifar10`` (torchvision; downloaded on first use) are held in memory as one uint8 tensor;
``image_folder`` reads files lazily. Train and validation sets are a seeded random split.
"""

from __future__ import annotations

import abc
import json
import logging
import pickle
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset, random_split

from diffusion.errors import ConfigError, DataError
from diffusion.training.determinism import ResumableSampler, mix

log = logging.getLogger(__name__)
# Our training loader does resume mid-epoch (its position is in the data module's state_dict),
# which Lightning cannot see on the DataLoader itself.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before")


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [0, 255] -> float [-1, 1]."""
    return images.float() / 127.5 - 1.0


class TensorImages(Dataset):
    """A uint8 tensor (N, C, H, W) as a dataset of images, or of (image, label) pairs when
    ``with_labels`` is set (``targets``: the class of each image, (N,) int64)."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor | None = None) -> None:
        self.images, self.targets = images, targets
        self.with_labels = False

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.with_labels:
            return self.images[index], self.targets[index]
        return self.images[index]


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize square uint8 images (N, C, h, w) to (N, C, size, size), bilinear with antialiasing."""
    if images.shape[-2:] == (size, size):
        return images
    out = [
        F.interpolate(
            chunk.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        for chunk in images.split(4096)
    ]
    return torch.cat(out).round().clamp(0, 255).to(torch.uint8)


def convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 (N, C, H, W) to ``channels``: grayscale repeated to RGB, or RGB to luma (ITU-R 601)."""
    c = images.shape[1]
    if c == channels:
        return images
    if c == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    if c == 3 and channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    raise ConfigError(f"cannot convert {c}-channel images to data.channels={channels}; use 1 or 3")


class ImageDataModule(LightningDataModule, abc.ABC):
    """A seeded train/validation split of square uint8 images, served as [-1, 1] float batches.

    Args:
        image_size: side of the square images the model sees.
        channels: 1 (grayscale) or 3 (RGB); datasets are converted when they differ.
        batch_size: per device.
        val_fraction: share of the images held out for validation (at least one image).
        hflip: random horizontal flips of training batches.
        num_workers, pin_memory: passed to the DataLoaders.
        seed: seed of the train/validation split, the data order and the flips.
    """

    def __init__(
        self,
        image_size: int,
        channels: int,
        batch_size: int = 128,
        val_fraction: float = 0.05,
        hflip: bool = False,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(image_size, int) or image_size < 1:
            raise ConfigError(f"data.image_size must be a positive integer, got {image_size!r}")
        if channels not in (1, 3):
            raise ConfigError(f"data.channels must be 1 or 3, got {channels!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"data.batch_size must be an integer >= 1, got {batch_size!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {val_fraction!r}")
        self.image_size = image_size
        self.channels = channels
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.hflip = hflip
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self._position = (0, 0)  # (epoch, training batches consumed in it)
        self._resume_at: tuple[int, int] | None = None
        self.labels = False  #: yield (images, labels): set for a class-conditional model
        self.captions = False  #: yield (images, captions): set for a text-conditional model

    def class_names(self) -> list[str] | None:
        """The names of the classes, in label order; None when the data has no labels."""
        return None

    def has_captions(self) -> bool:
        """Whether the images have captions (cheaply, before any loading)."""
        return False

    @abc.abstractmethod
    def load(self) -> Dataset:
        """The whole dataset: items are uint8 tensors (channels, image_size, image_size)."""

    def check(self) -> None:
        """Fail at start-up, before a run writes anything, where the data is surely missing
        (cheap checks only; loading may still find more)."""

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        full = self.load()
        if self.labels:
            if getattr(full, "targets", None) is None:
                raise DataError("this data has no labels for a class-conditional model")
            full.with_labels = True
        if self.captions:
            if getattr(full, "captions", None) is None:
                raise DataError("this data has no captions for a text-conditional model")
            full.targets, full.with_labels = full.captions, True  # yield (image, caption)
        n_val = max(1, round(len(full) * self.val_fraction))
        if len(full) - n_val < 1:
            raise DataError(
                f"{len(full)} image(s) are too few to split into training and validation"
            )
        generator = torch.Generator().manual_seed(self.seed)
        train, val = random_split(full, [len(full) - n_val, n_val], generator=generator)
        self.train_set, self.val_set = train, val

    def _loader(
        self, dataset: Dataset | None, sampler: ResumableSampler | None = None
    ) -> DataLoader:
        assert dataset is not None, "call setup() first"
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=sampler is not None and len(sampler) >= self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def train_dataloader(self) -> DataLoader:
        """Shuffled by ``seed + epoch``, one shard per rank; resumes mid-epoch (see
        diffusion.determinism)."""
        assert self.train_set is not None, "call setup() first"
        world, rank = self._rank()
        sampler = ResumableSampler(self.train_set, world, rank, self.seed)
        if self._resume_at is not None:
            epoch, batches = self._resume_at
            sampler.resume_at(epoch, batches * self.batch_size)
            self._resume_at = None
        return self._loader(self.train_set, sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """uint8 images -> [-1, 1] (flipped at random in training); labels pass through."""
        if isinstance(batch, (tuple, list)):
            images, labels = batch
            return self.on_after_batch_transfer(images, dataloader_idx), labels
        x = to_model_range(batch)
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return x
        epoch = trainer.current_epoch
        if epoch != self._position[0]:
            self._position = (epoch, 0)
        if self.hflip:
            seed = mix(self.seed, epoch, self._position[1], self._rank()[1])
            generator = torch.Generator(x.device).manual_seed(seed)
            flip = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        self._position = (epoch, self._position[1] + 1)
        return x

    # Where the training loader is in its epoch, saved in checkpoints by Lightning.
    def state_dict(self) -> dict:
        return {"epoch": self._position[0], "batches": self._position[1]}

    def load_state_dict(self, state: dict) -> None:
        if "epoch" in state:
            self._position = (state["epoch"], state["batches"])
            self._resume_at = self._position


class DigitsDataModule(ImageDataModule):
    """scikit-learn's bundled handwritten digits (1,797 real 8×8 images), upsampled; no network."""

    def __init__(self, image_size: int = 16, channels: int = 1, **kwargs) -> None:
        super().__init__(image_size, channels, **kwargs)

    def class_names(self) -> list[str]:
        return [str(d) for d in range(10)]

    def load(self) -> Dataset:
        from sklearn.datasets import load_digits

        digits = load_digits()
        pixels = torch.from_numpy(digits.images).float()  # (1797, 8, 8), values 0..16
        images = (pixels * (255.0 / 16.0)).round().to(torch.uint8)[:, None]
        images = convert_channels(resize_uint8(images, self.image_size), self.channels)
        return TensorImages(images, torch.as_tensor(digits.target, dtype=torch.long))


CLASS_NAMES = {  # torchvision's, in label order
    "mnist": [str(d) for d in range(10)],
    "fashion_mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                "truck"],
}  # fmt: skip
_TORCHVISION = {
    "mnist": ("MNIST", ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"]),
    "fashion_mnist": ("FashionMNIST", ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"]),
    "cifar10": ("CIFAR10", [f"data_batch_{i}" for i in range(1, 6)]),
}


class TorchvisionDataModule(ImageDataModule):
    """The training split of MNIST, Fashion-MNIST or CIFAR-10, downloaded by torchvision once.

    Files live where torchvision puts them: ``{root}/MNIST/raw/``,
    ``{root}/FashionMNIST/raw/`` (uncompressed IDX files) and ``{root}/cifar-10-batches-py/``.
    """

    def __init__(self, dataset: str, root: str, image_size: int, channels: int, **kwargs) -> None:
        if dataset not in _TORCHVISION:
            raise ConfigError(
                f"data.dataset={dataset!r} is unknown; choose one of {sorted(_TORCHVISION)}"
            )
        super().__init__(image_size, channels, **kwargs)
        self.dataset = dataset
        self.root = Path(root).expanduser()

    @property
    def folder(self) -> Path:
        name = _TORCHVISION[self.dataset][0]
        return self.root / ("cifar-10-batches-py" if name == "CIFAR10" else f"{name}/raw")

    def _missing(self) -> list[str]:
        return [f for f in _TORCHVISION[self.dataset][1] if not (self.folder / f).is_file()]

    def prepare_data(self) -> None:
        if not self._missing():
            return
        import torchvision.datasets as tvd

        cls = getattr(tvd, _TORCHVISION[self.dataset][0])
        try:
            cls(str(self.root), train=True, download=True)
        except Exception as err:  # no network, proxy, checksum: all end the same way for the user
            raise DataError(
                f"{self.dataset} is not in {self.folder} and could not be downloaded ({err}). "
                f"If this machine is offline, copy the files {self._missing()} into {self.folder} "
                f"(or set data.root / DIFFUSION_DATA_DIR to where they are)."
            ) from None

    def class_names(self) -> list[str]:
        return list(CLASS_NAMES[self.dataset])

    def load(self) -> Dataset:
        missing = self._missing()
        if missing:
            raise DataError(f"{self.dataset}: files {missing} are missing from {self.folder}")
        if self.dataset == "cifar10":
            images, targets = self._read_cifar()
        else:
            from torchvision.datasets.mnist import read_image_file, read_label_file

            images = read_image_file(str(self.folder / "train-images-idx3-ubyte"))[:, None]
            targets = read_label_file(str(self.folder / "train-labels-idx1-ubyte")).long()
        images = resize_uint8(images, self.image_size)
        return TensorImages(convert_channels(images, self.channels), targets)

    def _read_cifar(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Read the pickled batches directly: torchvision's CIFAR10 insists on the full set's md5.
        arrays, labels = [], []
        for name in _TORCHVISION["cifar10"][1]:
            with open(self.folder / name, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            arrays.append(torch.as_tensor(entry["data"], dtype=torch.uint8).reshape(-1, 3, 32, 32))
            labels.append(torch.as_tensor(entry["labels"], dtype=torch.long))
        return torch.cat(arrays), torch.cat(labels)


def square_uint8(img, size: int, mode: str) -> torch.Tensor:
    """A PIL image as uint8 (C, size, size): converted to ``mode`` (L or RGB), resized (shorter
    side) and centre-cropped."""
    from torchvision.transforms.v2 import functional as TF

    img = TF.resize(img.convert(mode), size, antialias=True)
    return TF.pil_to_tensor(TF.center_crop(img, [size, size]))


METADATA = "metadata.jsonl"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class FolderImages(Dataset):
    """Images found recursively under a folder, each resized (shorter side) and centre-cropped."""

    def __init__(
        self,
        files: list[Path],
        image_size: int,
        channels: int,
        on_corrupt: str,
        targets: torch.Tensor | None = None,
        captions: list[str] | None = None,
    ) -> None:
        self.files, self.captions = files, captions
        self.image_size = image_size
        self.mode = "L" if channels == 1 else "RGB"
        self.on_corrupt = on_corrupt
        self.targets, self.with_labels = targets, False

    def __len__(self) -> int:
        return len(self.files)

    def read(self, path: Path) -> torch.Tensor:
        from PIL import Image

        with Image.open(path) as img:
            return square_uint8(img, self.image_size, self.mode)

    def __getitem__(self, index: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # An unreadable file is an error, or (on_corrupt=skip) replaced by the next readable one.
        for offset in range(len(self.files)):
            at = (index + offset) % len(self.files)
            try:
                image = self.read(self.files[at])
                return (image, self.targets[at]) if self.with_labels else image
            except Exception as err:
                path = self.files[at]
                if self.on_corrupt == "error":
                    raise DataError(
                        f"cannot read image {path}: {err} "
                        "(set data.on_corrupt=skip to skip such files)"
                    ) from None
                log.warning("skipping unreadable image %s: %s", path, err)
        raise DataError(f"none of the {len(self.files)} files under the image folder could be read")


class ImageFolderDataModule(ImageDataModule):
    """Any folder of images (searched recursively), resized and centre-cropped to ``image_size``.
    With one subfolder per class and every image inside one (torchvision's ImageFolder layout),
    the subfolders, sorted, are the classes. Captions, for a text-conditional model: a
    ``metadata.jsonl`` at the root (one ``{"file_name": …, "text": …}`` per line, the layout of
    Hugging Face's imagefolder), or a ``.txt`` beside each image (same name).

    Args:
        root: the folder.
        on_corrupt: ``skip`` (warn and use the next image) or ``error`` for unreadable files.
    """

    def __init__(
        self, root: str, image_size: int, channels: int, on_corrupt: str = "skip", **kwargs
    ) -> None:
        super().__init__(image_size, channels, **kwargs)
        if on_corrupt not in ("skip", "error"):
            raise ConfigError(f"data.on_corrupt must be 'skip' or 'error', got {on_corrupt!r}")
        self.root = Path(root).expanduser()
        self.on_corrupt = on_corrupt

    def check(self) -> None:
        if not self.root.is_dir():
            raise DataError(
                f"data.root={str(self.root)!r} is not a folder; point it at a folder of images"
            )

    def _files(self) -> list[Path]:
        return sorted(
            p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )

    def class_names(self) -> list[str] | None:
        """The subfolders, if every image lies in one (the ImageFolder layout); else None."""
        if not self.root.is_dir():
            return None
        names = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        files = self._files()
        if not names or not files or any(f.parent == self.root for f in files):
            return None
        return names

    def has_captions(self) -> bool:
        if (self.root / METADATA).is_file():
            return True
        return self.root.is_dir() and any(f.with_suffix(".txt").is_file() for f in self._files())

    def read_captions(self, files: list[Path]) -> list[str] | None:
        """The caption of each file (metadata.jsonl, else .txt files), or None without any; a
        DataError naming a caption whose image is missing, or an image without a caption."""
        metadata = self.root / METADATA
        if metadata.is_file():
            by_file = {}
            for number, line in enumerate(metadata.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    name, text = entry["file_name"], entry["text"]
                except (ValueError, KeyError, TypeError):
                    raise DataError(
                        f"{metadata}:{number} is not a JSON object with file_name and text"
                    ) from None
                if not (self.root / name).is_file():
                    raise DataError(f"{metadata}:{number} names {name!r}, which is not an image "
                                    f"under {self.root}")  # fmt: skip
                by_file[(self.root / name).resolve()] = str(text)
            captions = [by_file.get(f.resolve()) for f in files]
        else:
            captions = [f.with_suffix(".txt").read_text().strip() if f.with_suffix(".txt")
                        .is_file() else None for f in files]  # fmt: skip
            if all(c is None for c in captions):
                return None
        missing = [f for f, c in zip(files, captions, strict=True) if c is None]
        if missing:
            raise DataError(
                f"{len(missing)} image(s) under {self.root} have no caption (first: "
                f"{missing[0].relative_to(self.root)}); caption every image, or move it out"
            )
        return captions

    def load(self) -> Dataset:
        self.check()
        files = self._files()
        if not files:
            raise DataError(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {self.root}; "
                "check data.root"
            )
        names = self.class_names()
        targets = None
        if names is not None:
            index = {name: i for i, name in enumerate(names)}
            targets = torch.tensor([index[f.relative_to(self.root).parts[0]] for f in files])
        captions = self.read_captions(files) if self.captions else None
        return FolderImages(
            files, self.image_size, self.channels, self.on_corrupt, targets, captions
        )


__all__ = [
    "DigitsDataModule",
    "ImageDataModule",
    "ImageFolderDataModule",
    "TorchvisionDataModule",
]
