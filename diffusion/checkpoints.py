"""Checkpoints: written atomically, loaded with clear errors instead of pickle tracebacks, and
never able to run code.

A checkpoint is a pickle, and unpickling can call any function the file names. Every load here
(sampling, evaluation, resuming through Lightning) is ``torch.load(weights_only=True)``: tensors
and plain containers only, which is all our checkpoints hold (configs are stored as plain dicts).
A file that names anything else is refused; ``trust_checkpoint=true`` loads it anyway, for files
whose author the user trusts.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from diffusion.compat import upgrade, with_defaults
from diffusion.config import NODE, OPTIONAL_NODE, Field
from diffusion.errors import UserError
from diffusion.processes.prediction import TARGETS
from diffusion.training.module import DiffusionModule

UNREADABLE = (RuntimeError, EOFError, OSError, KeyError, ValueError, pickle.UnpicklingError)
DIFFUSERS = "diffusers:"  #: ckpt=diffusers:<folder or hub id> imports a diffusers model
TRUST_HINT = "if you trust its author, add trust_checkpoint=true"


def pick_device(name: str) -> torch.device:
    """``auto`` (a GPU when there is one), ``cpu``, ``cuda``, ``cuda:1``, …; a UserError naming
    ``device`` if this machine does not have it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"device={name!r} is invalid: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0 or (device.index or 0) >= count:
            raise UserError(
                f"device={name!r} is invalid: this machine has {count} CUDA GPU(s); use "
                "device=cpu or device=auto"
            )
    elif device.type not in ("cpu", "mps"):
        raise UserError(f"device={name!r} is invalid: use auto, cpu, cuda or cuda:N")
    return device


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _unreadable(path: Path, err: BaseException) -> UserError:
    """The one-line error for a checkpoint that ``torch.load`` refused or could not parse."""
    if isinstance(err, pickle.UnpicklingError) and "weights_only" in str(err).lower():
        return UserError(
            f"checkpoint {str(path)!r} holds more than tensors and plain containers, and loading "
            f"it could run code, so it is refused; {TRUST_HINT}"
        )
    return UserError(
        f"cannot read checkpoint {str(path)!r}: it is truncated, corrupt or not a checkpoint "
        f"({type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''})"
    )


def load_module(
    path: str | Path,
    device: torch.device | str = "cpu",
    prediction: str | None = None,
    trust: bool = False,
) -> DiffusionModule:
    """The :class:`~diffusion.training.module.DiffusionModule` at ``path``, in eval mode on
    ``device``, loaded without running code from the file unless ``trust``; ``diffusers:<folder
    or hub id>`` imports a diffusers model (diffusion.interchange). ``prediction``, if given,
    must be the target the checkpoint was trained for: a network trained to predict one target
    cannot be read as another."""
    if str(path).startswith(DIFFUSERS):
        from diffusion.interchange.folder import load

        try:
            module = load(str(path), torch.device(device))
        except UserError as err:  # one line naming the key, whichever step refused
            raise type(err)(f"ckpt={str(path)!r}: {err}") from None
    else:
        path = Path(path).expanduser()
        check_readable(path, trust)
        try:
            module = DiffusionModule.load_from_checkpoint(
                path, map_location=torch.device(device), weights_only=not trust
            )
        except UNREADABLE as err:
            raise _unreadable(path, err) from None
    trained = module.hparams.get("prediction", "eps")
    if prediction is not None and prediction != trained:
        raise UserError(
            f"prediction={prediction!r}, but checkpoint {str(path)!r} was trained with "
            f"module.prediction={trained!r}: its network cannot be read as another target; drop "
            "prediction= (the checkpoint's own is used)"
        )
    return module.eval()


# The module settings a run started from other weights takes from them (module.init_from).
INIT_KEYS = ("net", "schedule", "T", "process", "prediction", "learn_sigma", "sigma_data")


def init_source(spec: str, trust: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
    """The settings (:data:`INIT_KEYS`, and ``image_shape``) and network weights a run started
    with ``module.init_from=spec`` takes: a diffusers folder or hub id (``diffusers:…``), or a
    checkpoint of ours (its EMA weights)."""
    if spec.startswith(DIFFUSERS):
        from diffusion.interchange.folder import module_settings

        hparams, state, _ = module_settings(spec)
    else:
        module = load_module(spec, trust=trust)
        hparams, state = dict(module.hparams), module.ema.module.state_dict()
    keys = (*INIT_KEYS, "image_shape")
    return {k: hparams.get(k) for k in keys if k in hparams}, state


def checkpoint_id(ckpt: str) -> str:
    """``ckpt`` as recorded in info files: a checkpoint's absolute path, or ``diffusers:…``."""
    return ckpt if str(ckpt).startswith(DIFFUSERS) else str(Path(ckpt).expanduser().resolve())


CHECKPOINT_FIELDS = {
    "ckpt": Field("checkpoint"), "use_ema": Field("bool"), "trust_checkpoint": Field("bool"),
    "prediction": Field("choice", choices=TARGETS, nullable=True), "device": Field("device"),
    "keep_freed_memory": Field("bool"), "seed": Field("int", 0), "out_dir": Field("dir"),
    "sampler": OPTIONAL_NODE, "paths": NODE,
}  # fmt: skip
"""The keys of the entry points that read a checkpoint: which, how to read and run it."""


def load_checkpoint(cfg: DictConfig, device: torch.device) -> DiffusionModule:
    """The checkpoint's module, checked against ``prediction``, with ``sampler`` validated."""
    module = load_module(cfg.ckpt, device, cfg.get("prediction"), bool(cfg.get("trust_checkpoint")))
    if cfg.get("sampler"):
        module.validate_sampler(OmegaConf.to_container(cfg.sampler, resolve=True))
    return module


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O that never leaves a half-written checkpoint behind.

    The checkpoint is written to a temporary file in the same folder, flushed and fsync'ed,
    then renamed over the target (``os.replace`` is atomic on POSIX and Windows), and the
    folder is fsync'ed so the rename itself survives a power cut. A ``kill -9`` at any moment
    leaves either the previous file or the new one, never a truncated one. Checkpoints are read
    with ``weights_only=True`` (module docstring) unless ``trust_checkpoint``.
    """

    def __init__(self, trust_checkpoint: bool = False) -> None:
        super().__init__()
        self.trust_checkpoint = trust_checkpoint

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return super().load_checkpoint(path, map_location, weights_only=not self.trust_checkpoint)

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())  # as any file the user writes, not mkstemp's 0600
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


def check_readable(path: str | Path, trust: bool = False) -> dict:
    """The checkpoint at ``path`` (memory-mapped, loaded without running code unless ``trust``);
    a UserError naming ``path`` if it is missing or not a readable checkpoint."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not trust, mmap=True)
    except Exception as err:
        raise _unreadable(path, err) from None
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
    "sigma_data": ("module.sigma_data", 0.5),
    "text_encoder": ("text_encoder", None),
}


def _differences(saved: Any, current: Any, name: str) -> list[str]:
    if isinstance(saved, Mapping) and isinstance(current, Mapping):
        keys = sorted(set(saved) | set(current), key=str)
        return [d for k in keys for d in _differences(saved.get(k), current.get(k), f"{name}.{k}")]
    if isinstance(saved, (list, tuple)) and isinstance(current, (list, tuple)):
        saved, current = list(saved), list(current)
    return [] if saved == current else [f"{name}: checkpoint {saved!r}, config {current!r}"]


def check_resumable(path: str | Path, module_cfg: Mapping, trust: bool = False) -> None:
    """Raise a UserError if the checkpoint at ``path`` was trained with another network,
    schedule, T or image shape than the module config ``module_cfg`` (a plain dict)."""
    saved = with_defaults(upgrade(dict(check_readable(path, trust).get("hyper_parameters") or {})))
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
