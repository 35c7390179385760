"""Start-up checks of a composed config, so that bad input fails in seconds with a message that
names the key and what is allowed, instead of a traceback an hour into training.

Hydra already rejects unknown command-line keys (struct mode) and unknown group options
(``schedule=foo`` lists the available ones). This module adds what Hydra cannot know:
  - every ``_target_`` node may only hold keys its target accepts (a typo in a YAML file);
  - the primary config holds only known top-level keys;
  - values that are valid YAML but cannot work (T ≤ 0, a negative learning rate, …).
Errors raised by constructors during instantiation are turned into :class:`ConfigError` by
:func:`build`, prefixed with the config path.
"""

from __future__ import annotations

import inspect
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from hydra.utils import get_object, instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, ListConfig, OmegaConf

from diffusion.errors import ConfigError, UserError


# ----- the top-level keys of every entry point ----------------------------------------------
@dataclass(frozen=True)
class Field:
    """What one top-level key of an entry point accepts. ``kind``: ``int``, ``float``, ``bool``,
    ``str``, ``choice`` (one of ``choices``), ``file`` (an existing file), ``dir`` (a folder
    that exists or can be created), ``device``, ``list`` (of ``choices``, or of ints >=
    ``minimum``), ``labels`` (``all`` or a list of class indices), ``node`` (a config group).
    ``minimum`` is inclusive."""

    kind: str
    minimum: float | None = None
    choices: tuple[str, ...] = ()
    nullable: bool = False


def unwritable(path: str | Path) -> str | None:
    """Why the folder ``path`` cannot be created or written, or None if it can."""
    path = Path(path).expanduser().absolute()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        return f"{str(probe)!r} is a file, not a folder"
    try:  # a real probe: permission bits say nothing to root, nor about read-only mounts
        tempfile.TemporaryDirectory(dir=probe).cleanup()
    except OSError as err:
        return f"nothing can be created in {str(probe)!r} ({err.strerror or err})"
    return None


def _field_error(key: str, value: Any, field: Field) -> str | None:
    """The reason ``value`` does not fit ``field``, or None."""
    if value is None:
        return None if field.nullable else "it must be given"
    kind = field.kind
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "int" and not (isinstance(value, int) and not isinstance(value, bool)):
        return "it must be an integer" + (f" >= {field.minimum:g}" if field.minimum is not None
                                          else "")  # fmt: skip
    if kind == "float" and not number:
        return "it must be a number" + (f" >= {field.minimum:g}" if field.minimum is not None
                                        else "")  # fmt: skip
    if kind in ("int", "float") and field.minimum is not None and value < field.minimum:
        return f"it must be >= {field.minimum:g}"
    if kind == "bool" and not isinstance(value, bool):
        return "it must be true or false"
    if kind in ("str", "file", "dir", "device", "checkpoint") and not isinstance(value, str):
        return "it must be a string"
    if kind == "choice" and value not in field.choices:
        return f"choose one of {list(field.choices)}"
    if kind == "file" and not Path(value).expanduser().is_file():
        return "the file does not exist"
    if kind == "checkpoint" and not value.startswith("diffusers:"):
        if not Path(value).expanduser().is_file():
            return "the file does not exist (a diffusers folder or hub id: diffusers:<…>)"
    if kind == "dir":
        return unwritable(value)
    if kind == "device":
        from diffusion.checkpoints import pick_device

        try:
            pick_device(value)
        except UserError as err:
            return str(err).split("is invalid: ", 1)[-1]
    if kind == "list":
        if not isinstance(value, ListConfig | list):
            return "it must be a list, e.g. [a,b]"
        for item in value:
            if field.choices and item not in field.choices:
                return f"its items must be among {list(field.choices)}"
            integer = isinstance(item, int) and not isinstance(item, bool)
            if field.minimum is not None and not (integer and item >= field.minimum):
                return f"its items must be integers >= {field.minimum:g}"
    if kind == "labels" and value != "all":
        items = value if isinstance(value, ListConfig | list) else [value]
        if not isinstance(value, ListConfig | list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items
        ):
            return "give all (every class) or a list of class indices >= 0, e.g. [3,3,7]"
    if kind == "node" and not isinstance(value, DictConfig):
        return "it must be a config group (group=option), not a single value"
    return None


def check_fields(cfg: DictConfig, fields: Mapping[str, Field], entry: str) -> None:
    """Every top-level key of an entry point's config is known and fits its :class:`Field`;
    a ConfigError naming the key, the value and what is allowed otherwise."""
    keys = [k for k in cfg.keys() if k != "hydra"]
    unknown = sorted(set(keys) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} for python -m diffusion.{entry}; allowed: {sorted(fields)}"
        )
    nodes_first = sorted(keys, key=lambda k: fields[k].kind != "node")  # others interpolate them
    for key in nodes_first:
        try:
            value = cfg[key]
        except Exception as err:  # an interpolation that cannot be resolved
            raise ConfigError(f"{key}: {str(err).splitlines()[0]}") from None
        reason = _field_error(key, value, fields[key])
        if reason:
            shown = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
            raise ConfigError(f"{key}={shown!r} is invalid: {reason}")


class OutputDirCheck(Callback):
    """Hydra callback: before Hydra creates the run (or sweep) folder, check that it can, so a
    folder under a read-only or missing root is one line and exit status 2, not a traceback."""

    def _check(self, key: str, path: str) -> None:
        reason = unwritable(path)
        if reason:
            print(f"error: {key}={path!r} cannot be created: {reason}", file=sys.stderr)
            sys.exit(2)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check("hydra.run.dir", config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check("hydra.sweep.dir", config.hydra.sweep.dir)


HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
NODE, OPTIONAL_NODE = Field("node"), Field("node", nullable=True)
TRAIN_FIELDS = {
    **{group: NODE for group in ("data", "model", "schedule", "process", "sampler", "trainer",
                                 "callbacks", "paths", "module", "optimizer", "loss_weight")},
    "logger": OPTIONAL_NODE, "experiment": OPTIONAL_NODE, "text_encoder": OPTIONAL_NODE,
    "T": Field("int", 1),
    "seed": Field("int", 0), "ckpt_path": Field("str", nullable=True),
    "optimize_metric": Field("choice", choices=("val/loss", "val/fid", "val/kid")),
    "keep_freed_memory": Field("bool"), "trust_checkpoint": Field("bool"),
    "task_name": Field("str", nullable=True), "tags": Field("list", nullable=True),
}  # fmt: skip
"""The top-level keys of ``python -m diffusion.train``."""


def accepted_parameters(target: Any) -> set[str] | None:
    """Keyword names ``target`` accepts, following ``**kwargs`` up a class's MRO; None = any."""
    owners = [c.__init__ for c in target.__mro__] if inspect.isclass(target) else [target]
    names: set[str] = set()
    for fn in owners:
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):
            return None
        names |= {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names - {"self"}
    return None


def _target_nodes(node: Any, path: str) -> Iterator[tuple[str, DictConfig]]:
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield path, node
        for key in node.keys():
            if OmegaConf.is_interpolation(node, key):
                continue  # e.g. module.net: ${model}, checked where it is defined
            yield from _target_nodes(node.get(key), f"{path}.{key}" if path else str(key))
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node):
            yield from _target_nodes(item, f"{path}[{i}]")


def check_keys(cfg: DictConfig) -> None:
    """Reject unknown or ill-typed top-level keys and keys a ``_target_`` does not accept."""
    check_fields(cfg, TRAIN_FIELDS, "train")
    for path, node in _target_nodes(cfg, ""):
        try:
            target = get_object(node._target_)
        except Exception:
            raise ConfigError(f"{path}._target_={node._target_!r} cannot be imported") from None
        allowed = accepted_parameters(target)
        if allowed is None:
            continue
        extra = sorted(set(node.keys()) - HYDRA_KEYS - allowed)
        if extra:
            raise ConfigError(
                f"{path}: unknown key(s) {extra} for {node._target_}; allowed: {sorted(allowed)}"
            )


def check_values(cfg: DictConfig) -> None:
    """Range checks on values Hydra cannot type-check (the constructors check the rest)."""
    lr = cfg.get("optimizer", {}).get("lr")
    if lr is not None and (not isinstance(lr, (int, float)) or lr <= 0):
        raise ConfigError(f"optimizer.lr={lr!r} is invalid: the learning rate must be > 0")
    decay = cfg.module.get("ema_decay")
    if not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
        raise ConfigError(
            f"module.ema_decay={decay!r} is invalid: it must be in [0, 1), e.g. 0.9999"
        )
    trainer = cfg.get("trainer") or {}
    for key, minimum in (("max_steps", -1), ("accumulate_grad_batches", 1),
                         ("log_every_n_steps", 1), ("num_sanity_val_steps", -1)):  # fmt: skip
        value = trainer.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < minimum):  # fmt: skip
            raise ConfigError(
                f"trainer.{key}={value!r} is invalid: it must be an integer >= {minimum}"
            )
    interval = trainer.get("val_check_interval")
    if interval is not None and (not isinstance(interval, (int, float)) or interval <= 0):
        raise ConfigError(
            f"trainer.val_check_interval={interval!r} is invalid: steps (an integer) or a "
            "fraction of an epoch (a float in (0, 1])"
        )
    metric = cfg.get("optimize_metric", "val/loss")
    fid = (cfg.get("callbacks") or {}).get("fid") or {}
    if metric != "val/loss" and not fid.get("every_n_steps"):
        raise ConfigError(
            f"optimize_metric={metric} needs the FID callback: set callbacks.fid.every_n_steps"
        )
    check_objective(cfg.module)
    warmup = cfg.module.get("warmup_steps", 0)
    if not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"module.warmup_steps={warmup!r} is invalid: it must be an integer >= 0")


def check_objective(module: DictConfig) -> None:
    """``module.prediction`` and ``module.loss_weight`` name a known target and weighting, and the
    objective's numbers are in range."""
    from diffusion.processes.prediction import TARGETS
    from diffusion.training.weighting import shipped

    prediction = module.get("prediction", "eps")
    if prediction not in TARGETS:
        raise ConfigError(
            f"module.prediction={prediction!r} is invalid: choose one of {list(TARGETS)}"
        )
    weight = module.get("loss_weight")
    if isinstance(weight, str) and weight not in shipped():
        raise ConfigError(
            f"module.loss_weight={weight!r} is invalid: choose one of {shipped()} "
            "(conf/loss_weight/)"
        )
    learn_sigma = module.get("learn_sigma", False)
    if not isinstance(learn_sigma, bool):
        raise ConfigError(f"module.learn_sigma={learn_sigma!r} is invalid: use true or false")
    vlb_weight = module.get("vlb_weight", 0.001)
    if not isinstance(vlb_weight, (int, float)) or isinstance(vlb_weight, bool) or vlb_weight < 0:
        raise ConfigError(f"module.vlb_weight={vlb_weight!r} is invalid: it must be a number >= 0")
    sigma_data = module.get("sigma_data", 0.5)
    if not isinstance(sigma_data, (int, float)) or isinstance(sigma_data, bool) or sigma_data <= 0:
        raise ConfigError(
            f"module.sigma_data={sigma_data!r} is invalid: it must be a number > 0 (the data's "
            "standard deviation, 0.5 in EDM)"
        )
    if not module.get("process"):
        return
    from diffusion.training.objective import check_fits
    from diffusion.training.weighting import load_loss_weight

    process = build(module.process, "process")
    if isinstance(weight, DictConfig):
        weight = build(weight, "loss_weight")
    check_fits(
        process, load_loss_weight(weight or "simple"), learn_sigma,
        module.get("t_sampling", "uniform"),
    )  # fmt: skip


def check_model_fits_data(cfg: DictConfig) -> None:
    """The network's input channels and image size are the data's (they follow the data config
    unless overridden)."""
    model, data = cfg.get("model") or {}, cfg.get("data") or {}
    for model_key, data_key in (("in_channels", "channels"), ("image_size", "image_size")):
        if model_key in model and data_key in data and model[model_key] != data[data_key]:
            raise ConfigError(
                f"model.{model_key}={model[model_key]} does not match "
                f"data.{data_key}={data[data_key]}: the network must take the images the data "
                f"gives. Drop the model.{model_key} override (it follows data.{data_key}) or set "
                f"data.{data_key}={model[model_key]}"
            )


def _devices_here(accelerator: str) -> tuple[str, int] | None:
    """(what, how many) the machine has for ``accelerator``; None where Lightning must judge."""
    import torch

    if accelerator == "auto":
        accelerator = (
            "gpu" if torch.cuda.is_available()
            else "mps" if torch.backends.mps.is_available() else "cpu"
        )  # fmt: skip
    if accelerator in ("gpu", "cuda"):
        return "GPU(s)", torch.cuda.device_count()
    if accelerator == "mps":
        return "MPS device(s)", int(torch.backends.mps.is_available())
    if accelerator == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return "CPU core(s)", cores or 1
    return None


def check_devices(trainer: DictConfig) -> None:
    """``trainer.devices`` must not ask for more devices than this machine has."""
    accelerator = str(trainer.get("accelerator", "auto")).lower()
    devices = trainer.get("devices", "auto")
    here = _devices_here(accelerator)
    if here is None:
        return
    what, count = here
    if count == 0:
        raise ConfigError(
            f"trainer.accelerator={accelerator} but this machine has no {what}; "
            "use trainer=cpu (or trainer.accelerator=auto)"
        )
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    elif isinstance(devices, str) and "," in devices:
        devices = [int(d) for d in devices.split(",") if d.strip()]
    if isinstance(devices, ListConfig | list):
        wanted, too_many = len(devices), any(int(d) >= count for d in devices)
    elif isinstance(devices, int) and devices > 0:
        wanted, too_many = devices, devices > count
    else:  # "auto" or -1: all of them
        return
    if too_many:
        shown = OmegaConf.to_container(devices) if isinstance(devices, ListConfig) else devices
        raise ConfigError(
            f"trainer.devices={shown} asks for {wanted} device(s) but this machine has {count} "
            f"{what} for accelerator={accelerator}; use trainer.devices={min(count, wanted)} or "
            "fewer, or trainer.devices=auto"
        )


def check_config(cfg: DictConfig) -> None:
    """All start-up checks of ``diffusion.train``; raises :class:`ConfigError`."""
    check_keys(cfg)
    check_values(cfg)
    check_model_fits_data(cfg)
    if cfg.get("trainer") is not None:
        check_devices(cfg.trainer)


def build(node: DictConfig, path: str, **kwargs: Any) -> Any:
    """``instantiate(node)``, a constructor's ValueError/TypeError reported as ConfigError."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause: BaseException | None = err
        while isinstance(cause, InstantiationException):  # nested instantiate() calls
            cause = cause.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        if isinstance(cause, (ValueError, TypeError, MisconfigurationException)):
            raise ConfigError(f"{path}: {cause}") from None
        raise


def build_loggers(loggers: DictConfig | None) -> list:
    """Lightning loggers from the ``logger`` group (a mapping of name -> ``_target_`` node).
    W&B is switched to offline mode first when it has no credentials, so it never prompts."""
    nodes = {name: node for name, node in (loggers or {}).items() if node}
    if any("WandbLogger" in node._target_ for node in nodes.values()):
        from diffusion.wandb_mode import ensure_wandb_never_blocks

        ensure_wandb_never_blocks()
    return [build(node, f"logger.{name}") for name, node in nodes.items()]
