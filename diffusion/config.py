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
from collections.abc import Iterator
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from diffusion.errors import ConfigError, UserError

HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
TOP_LEVEL_KEYS = {
    "data", "model", "schedule", "sampler", "trainer", "callbacks", "logger", "paths",
    "module", "optimizer", "T", "seed", "ckpt_path", "experiment", "task_name", "tags",
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
    warmup = cfg.module.get("warmup_steps", 0)
    if not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"module.warmup_steps={warmup!r} is invalid: it must be an integer >= 0")


def check_config(cfg: DictConfig) -> None:
    """All start-up checks; raises :class:`ConfigError`."""
    check_keys(cfg)
    check_values(cfg)


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
        if isinstance(cause, (ValueError, TypeError)):
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
