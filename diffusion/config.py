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
from collections.abc import Iterator
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, ListConfig, OmegaConf

from diffusion.errors import ConfigError, UserError

HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
TOP_LEVEL_KEYS = {
    "data", "model", "schedule", "process", "sampler", "trainer", "callbacks", "logger", "paths",
    "module", "optimizer", "T", "seed", "ckpt_path", "experiment", "task_name", "tags",
    "optimize_metric", "keep_freed_memory", "loss_weight",
}  # fmt: skip


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
    """Reject unknown top-level keys and keys a ``_target_`` does not accept."""
    unknown = set(cfg.keys()) - TOP_LEVEL_KEYS
    if unknown:
        raise ConfigError(
            f"unknown top-level config key(s) {sorted(unknown)}; allowed: {sorted(TOP_LEVEL_KEYS)}"
        )
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
    T = cfg.get("T")
    if not isinstance(T, int) or isinstance(T, bool) or T < 1:
        raise ConfigError(
            f"T={T!r} is invalid: the number of diffusion steps must be an integer >= 1"
        )
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
    if metric not in ("val/loss", "val/fid", "val/kid"):
        raise ConfigError(
            f"optimize_metric={metric!r} is invalid: use val/loss, val/fid or val/kid"
        )
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
    """``module.prediction`` and ``module.loss_weight`` name a known target and weighting."""
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
    """All start-up checks; raises :class:`ConfigError`."""
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
