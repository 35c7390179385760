"""Streaming data: tar shards of image + caption through the ``webdataset`` library
(``data=webdataset``), for data that outgrows a folder and for multi-node runs.

A shard holds samples as files sharing a key: ``0001.png`` (or ``.jpg``, ``.jpeg``, ``.webp``)
and ``0001.txt`` (its caption), the layout of LAION-style datasets. Shards are split across DDP
ranks (rank r reads shards r, r + W, …) and, inside a rank, across loader workers, so every
sample is read once per epoch; each epoch shuffles the shards and, in a buffer, the samples
(seeded). Images are converted, resized and centre-cropped as ``image_folder``'s. Validation
reads ``val_urls``, or the last shard, held out from training (split across ranks too, or read
whole by each when there are fewer shards than ranks).

A stream has no index: a resumed run restarts its epoch's stream (the model, optimizer and EMA
resume exactly; the data order does not).
"""

from __future__ import annotations

import random
from pathlib import Path

from torch.utils.data import DataLoader, IterableDataset

from diffusion.errors import ConfigError, DataError
from diffusion.training.data import ImageDataModule, square_uint8

IMAGE_KEYS = "png;jpg;jpeg;webp"
CAPTION_KEYS = "txt;caption"


def expand(urls: str | list[str]) -> list[str]:
    """Shard URLs or paths, with brace patterns expanded (``train-{000..099}.tar``)."""
    from webdataset.shardlists import expand_urls

    return [u for pattern in ([urls] if isinstance(urls, str) else urls)
            for u in expand_urls(str(pattern))]  # fmt: skip


class WebDataModule(ImageDataModule):
    """Image (+ caption) samples streamed from tar shards.

    Args:
        urls: the training shards (brace patterns, paths or URLs webdataset can open).
        val_urls: the validation shards; None holds the last training shard out for it.
        shuffle_buffer: samples shuffled in a buffer of this size (0: shard order only).
        Others as :class:`~diffusion.training.data.ImageDataModule`'s.
    """

    def __init__(
        self,
        urls: str | list[str],
        image_size: int,
        channels: int,
        val_urls: str | list[str] | None = None,
        shuffle_buffer: int = 1000,
        **kwargs,
    ) -> None:
        super().__init__(image_size, channels, **kwargs)
        try:
            import webdataset  # noqa: F401
        except ImportError:
            raise ConfigError(
                "data=webdataset needs webdataset: pip install -e '.[text]'"
            ) from None
        self.urls, self.val_urls = expand(urls), expand(val_urls) if val_urls else None
        if not self.urls:
            raise ConfigError(f"data.urls={urls!r} names no shard")
        if self.val_urls is None and len(self.urls) < 2:
            raise ConfigError(
                f"data.urls={urls!r} is one shard: give data.val_urls, or two shards or more "
                "(the last is held out for validation)"
            )
        if shuffle_buffer < 0:
            raise ConfigError(f"data.shuffle_buffer={shuffle_buffer} must be >= 0")
        self.shuffle_buffer = shuffle_buffer
        self.mode = "L" if channels == 1 else "RGB"

    def _split(self) -> tuple[list[str], list[str]]:
        if self.val_urls is not None:
            return self.urls, self.val_urls
        return self.urls[:-1], self.urls[-1:]

    def check(self) -> None:
        local = [
            u for u in self.urls + (self.val_urls or []) if "://" not in u and "pipe:" not in u
        ]
        missing = [u for u in local if not Path(u).expanduser().is_file()]
        if missing:
            raise DataError(f"data.urls: {len(missing)} shard(s) missing, first {missing[0]!r}")

    def has_captions(self) -> bool:
        """Whether the first training shard's first sample has a caption (.txt or .caption)."""
        import tarfile

        first = Path(self._split()[0][0]).expanduser()
        if not first.is_file():
            return False  # remote shards: assumed to have them (a missing caption fails loading)
        with tarfile.open(first) as tar:
            names = []
            for member in tar:
                names.append(member.name)
                if len({n.rsplit(".", 1)[0] for n in names}) > 1:
                    break
        stem = names[0].rsplit(".", 1)[0]
        return any(n in (f"{stem}.txt", f"{stem}.caption") for n in names)

    def stream(self, urls: list[str], training: bool) -> IterableDataset:
        """The samples of ``urls`` for this rank: uint8 images, with captions if asked."""
        import webdataset as wds

        world, rank = self._rank()
        if training and len(urls) < world:
            raise DataError(
                f"{len(urls)} training shard(s) for {world} ranks: each rank needs one (data.urls)"
            )

        def this_rank(shards):  # validation with fewer shards than ranks: every rank reads all
            shards = list(shards)
            return shards[rank::world] if len(shards) >= world else shards

        dataset = wds.WebDataset(
            urls, nodesplitter=this_rank, shardshuffle=len(urls) if training else False,
            detshuffle=training, seed=self.seed, empty_check=False,
        )  # fmt: skip
        if training and self.shuffle_buffer:
            dataset = dataset.shuffle(self.shuffle_buffer, rng=random.Random(self.seed + rank))
        keys = [IMAGE_KEYS, CAPTION_KEYS] if self.captions else [IMAGE_KEYS]
        dataset = dataset.decode("pil").to_tuple(*keys)

        def convert(sample):
            image = square_uint8(sample[0], self.image_size, self.mode)
            return (image, str(sample[1])) if self.captions else image

        return dataset.map(convert)

    def load(self) -> IterableDataset:
        """The training stream of this rank."""
        return self.stream(self._split()[0], training=True)

    def setup(self, stage: str | None = None) -> None:
        if self.labels:
            raise DataError("data=webdataset has no class labels; use captions (text_encoder=)")
        self.check()
        self.train_set = self.load()
        self.val_set = self.stream(self._split()[1], training=False)

    def _stream_loader(self, dataset: IterableDataset) -> DataLoader:
        return DataLoader(
            dataset, batch_size=self.batch_size, num_workers=self.num_workers,
            pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0,
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        return self._stream_loader(self.train_set)

    def val_dataloader(self) -> DataLoader:
        return self._stream_loader(self.val_set)


__all__ = ["WebDataModule", "expand"]
