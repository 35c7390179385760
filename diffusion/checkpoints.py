"""Checkpoints: written atomically, loaded with clear errors instead of pickle tracebacks."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from diffusion.compat import upgrade, with_defaults
from diffusion.errors import UserError
from diffusion.training.module import DiffusionModule


def pick_device(name: str) -> torch.device:
    """``auto`` (a GPU when there is one), ``cpu``, ``cuda``, ``cuda:1``, …"""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_module(
    path: str | Path, device: torch.device | str = "cpu", prediction: str | None = None
) -> DiffusionModule:
    """The :class:`~diffusion.training.module.DiffusionModule` at ``path``, in eval mode on
    ``device``. ``prediction``, if given, must be the target the checkpoint was trained for: a
    network trained to predict one target cannot be read as another."""

    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist")
    try:
        module = DiffusionModule.load_from_checkpoint(path, map_location=torch.device(device))
    except (RuntimeError, EOFError, OSError, KeyError, ValueError) as err:
        raise UserError(
            f"cannot load checkpoint {str(path)!r}: it is truncated, corrupt or not a checkpoint "
            f"of diffusion.train ({type(err).__name__}: {str(err)[:200]})"
        ) from None
    trained = module.hparams.get("prediction", "eps")
    if prediction is not None and prediction != trained:
        raise UserError(
            f"prediction={prediction!r}, but checkpoint {str(path)!r} was trained with "
            f"module.prediction={trained!r}: its network cannot be read as another target; drop "
            "prediction= (the checkpoint's own is used)"
        )
    return module.eval()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O that never leaves a half-written checkpoint behind.

    The checkpoint is written to a temporary file in the same folder, flushed and fsync'ed,
    then renamed over the target (``os.replace`` is atomic on POSIX and Windows), and the
    folder is fsync'ed so the rename itself survives a power cut. A ``kill -9`` at any moment
    leaves either the previous file or the new one, never a truncated one.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if hasattr(os, "O_DIRECTORY"):  # make the rename durable (POSIX)
            dir_fd = os.open(path.parent, os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


def check_readable(path: str | Path) -> dict:
    """The checkpoint at ``path`` (memory-mapped); a UserError naming ``path`` if it is missing
    or not a readable checkpoint."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:
        raise UserError(
            f"cannot read checkpoint {str(path)!r}: it is truncated or corrupt "
            f"({type(err).__name__}: {str(err)[:160]}); resume from another checkpoint"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise UserError(f"{str(path)!r} is not a Lightning checkpoint of diffusion.train")
    return ckpt


# Module hyperparameters a resumed run must share with its checkpoint, their config names, and
# the value a checkpoint that predates the key meant.
MUST_MATCH = {
    "net": ("model", None),
    "process": ("process", None),
    "schedule": ("schedule", None),
    "T": ("T", None),
    "image_shape": ("data [C, H, W]", None),
    "prediction": ("module.prediction", "eps"),
    "learn_sigma": ("module.learn_sigma", False),
}


def _differences(saved: Any, current: Any, name: str) -> list[str]:
    if isinstance(saved, Mapping) and isinstance(current, Mapping):
        keys = sorted(set(saved) | set(current), key=str)
        return [d for k in keys for d in _differences(saved.get(k), current.get(k), f"{name}.{k}")]
    if isinstance(saved, (list, tuple)) and isinstance(current, (list, tuple)):
        saved, current = list(saved), list(current)
    return [] if saved == current else [f"{name}: checkpoint {saved!r}, config {current!r}"]


def check_resumable(path: str | Path, module_cfg: Mapping) -> None:
    """Raise a UserError if the checkpoint at ``path`` was trained with another network,
    schedule, T or image shape than the module config ``module_cfg`` (a plain dict)."""
    saved = with_defaults(upgrade(dict(check_readable(path).get("hyper_parameters") or {})))
    current = with_defaults(upgrade(dict(module_cfg)))
    for hparams in (saved, current):  # checkpoints from before process= meant DDPM's
        process = hparams.get("process")
        if process is None or str(process.get("_target_", "")).endswith(".ddpm"):
            hparams["process"] = "ddpm"
    diffs = [
        d for key, (name, default) in MUST_MATCH.items()
        for d in _differences(saved.get(key, default), current.get(key, default), name)
    ]  # fmt: skip
    if diffs:
        more = f" (and {len(diffs) - 5} more)" if len(diffs) > 5 else ""
        raise UserError(
            f"checkpoint {str(path)!r} was trained with another configuration: "
            f"{'; '.join(diffs[:5])}{more}. Resume with the overrides of the run that wrote it "
            "(its config.yaml is next to its checkpoints/ folder), or drop ckpt_path to start a "
            "new run; any checkpoint samples as it is with python -m diffusion.sample ckpt=..."
        )
