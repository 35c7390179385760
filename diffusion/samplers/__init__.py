"""Samplers: free functions with one signature (diffusion.samplers.base), each marked with the
view of a process it needs; spacings (which chain times to visit) in diffusion.samplers.spacing.

- chain samplers (``needs = "chain"``): ``ddpm_ancestral``, ``ddim``, ``dpm_solver``;
- SDE samplers (``"sde"``): ``euler_maruyama``, ``predictor_corrector``, ``probability_flow``,
  and EDM's ``heun`` and ``euler`` on Karras' σ steps (diffusion.samplers.karras);
- ``annealed_langevin`` (``"levels"``).

A sampler suits a process when the process ``offers`` what the sampler ``needs``: no table of
families, no class names. A sampler config in ``conf/sampler/`` names the function with
``_partial_: true`` and fixes its options, so a new sampler is one function plus one YAML file.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.resources import files
from typing import Any

from hydra.utils import get_object
from omegaconf import OmegaConf

from diffusion.errors import ConfigError
from diffusion.samplers.base import Callback, Step, needs
from diffusion.samplers.chain import ddim, ddim_encode, ddpm_ancestral, dpm_solver
from diffusion.samplers.karras import euler, heun
from diffusion.samplers.langevin import annealed_langevin
from diffusion.samplers.sde import euler_maruyama, predictor_corrector, probability_flow


def shipped() -> dict[str, str]:
    """The shipped sampler configs: name (conf/sampler/<name>.yaml) -> ``_target_``."""
    folder = files("diffusion.conf") / "sampler"
    configs = {p.name[:-5]: p for p in folder.iterdir() if p.name.endswith(".yaml")}
    return {
        name: str(OmegaConf.create(path.read_text())["_target_"])
        for name, path in sorted(configs.items())
    }


def name_of(target: str) -> str:
    """The config name of a sampler ``_target_`` (its function name if no config names it)."""
    from diffusion.compat import current_target

    target = current_target(target)
    return next((n for n, t in shipped().items() if t == target), target.rsplit(".", 1)[-1])


def suitable(process: Any) -> list[str]:
    """Names of the shipped samplers whose ``needs`` the process ``offers``."""
    return [name for name, t in shipped().items() if get_object(t).needs in process.offers]


def check_sampler(process: Any, sampler: Mapping) -> Any:
    """The sampler function of a sampler config; a ConfigError naming the samplers that suit
    ``process`` if this one needs a view the process does not offer."""
    from diffusion.compat import current_target

    target = current_target(str(sampler.get("_target_", "")))
    try:
        fn = get_object(target)
    except Exception:
        raise ConfigError(f"sampler._target_={target!r} cannot be imported") from None
    view = getattr(fn, "needs", None)
    if view is None:
        raise ConfigError(
            f"sampler._target_={target!r} is not a sampler (it is not marked with "
            "diffusion.samplers.needs); choose one of conf/sampler/"
        )
    if view not in process.offers:
        raise ConfigError(
            f"sampler {name_of(target)} cannot sample a process={process.family} model (it needs "
            f"the process's {view} view; {process.family} offers {sorted(process.offers)}); use "
            f"one of {', '.join(suitable(process))} (sampler=<name>, see conf/sampler/)"
        )
    return fn


__all__ = [
    "Callback", "Step", "annealed_langevin", "check_sampler", "ddim", "ddim_encode",
    "ddpm_ancestral", "dpm_solver", "euler", "euler_maruyama", "heun", "name_of", "needs",
    "predictor_corrector", "probability_flow", "shipped", "suitable",
]  # fmt: skip
