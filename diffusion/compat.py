"""Checkpoints and configs of earlier versions: their ``_target_`` paths and keys, as today's.

A checkpoint stores its configs as plain dicts with ``_target_`` paths. When modules moved
(diffusion.process -> diffusion.processes.ddpm, diffusion.score_samplers -> diffusion.samplers,
…) or keys were renamed (the SDEs' ``eps`` is now ``t_min``, since ε names the noise), the old
names are translated here, once, when a module is built from them; nothing else knows them.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

MOVED = {
    "diffusion.process.": "diffusion.processes.ddpm.",
    "diffusion.sde.NCSN": "diffusion.processes.ncsn.NCSN",
    "diffusion.sde.": "diffusion.processes.sde.",
    "diffusion.schedules.": "diffusion.processes.schedules.",
    "diffusion.samplers.ddpm_ancestral": "diffusion.samplers.chain.ddpm_ancestral",
    "diffusion.samplers.ddim": "diffusion.samplers.chain.ddim",
    "diffusion.samplers.dpm_solver": "diffusion.samplers.chain.dpm_solver",
    "diffusion.score_samplers.annealed_langevin": "diffusion.samplers.langevin.annealed_langevin",
    "diffusion.score_samplers.": "diffusion.samplers.sde.",
    "diffusion.module.": "diffusion.training.module.",
    "diffusion.data.": "diffusion.training.data.",
    "diffusion.callbacks.": "diffusion.training.callbacks.",
    "diffusion.metrics.": "diffusion.evaluation.metrics.",
}
"""Old ``_target_`` (or its prefix) -> today's; the first match wins."""

RENAMED_KEYS = {"diffusion.processes.sde.": {"eps": "t_min"}}
"""Keys renamed in the nodes of a target prefix: old key -> new key."""


def current_target(target: str) -> str:
    """Today's path of a ``_target_`` written by an earlier version (unchanged if current)."""
    for old, new in MOVED.items():
        if target == old or (old.endswith(".") and target.startswith(old)):
            return new + target[len(old) :] if old.endswith(".") else new
    return target


def upgrade(node: Any) -> Any:
    """A config (plain dicts and lists) with every ``_target_`` and renamed key made current."""
    if isinstance(node, Mapping):
        out = {k: upgrade(v) for k, v in node.items()}
        if isinstance(out.get("_target_"), str):
            out["_target_"] = current_target(out["_target_"])
            for prefix, renames in RENAMED_KEYS.items():
                if out["_target_"].startswith(prefix):
                    out = {renames.get(k, k): v for k, v in out.items()}
        return out
    if isinstance(node, list | tuple):
        return [upgrade(v) for v in node]
    return node


def with_defaults(node: Any) -> Any:
    """A config with the default of every parameter its ``_target_`` nodes leave out, so that a
    node written before a parameter existed compares equal to one that names its default."""
    from hydra.utils import get_object

    if isinstance(node, list | tuple):
        return [with_defaults(v) for v in node]
    if not isinstance(node, Mapping):
        return node
    out = {k: with_defaults(v) for k, v in node.items()}
    if isinstance(out.get("_target_"), str):
        try:
            params = inspect.signature(get_object(out["_target_"])).parameters.values()
        except Exception:
            return out
        for p in params:
            if p.default is not p.empty and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
                out.setdefault(p.name, p.default)
    return out
