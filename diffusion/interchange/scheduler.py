"""Our processes as diffusers' scheduler configs, and diffusers' DDPM / DDIM schedulers as ours.

DDPM's process (``family == "ddpm"``) is diffusers' ``DDPMScheduler``: the same β (a named
``beta_schedule`` when ours is one of diffusers' formulas to 1e-12, else ``trained_betas``), the
prediction target (ε ``epsilon``, x̂_0 ``sample``, v ``v_prediction``) and the ancestral
sampler's variance (σ² = β_t ``fixed_large``, β̃_t ``fixed_small``, Nichol & Dhariwal's learned
interpolation ``learned_range``, whose v ∈ [-1, 1] is ours) and x̂_0 clipping (``clip_sample``).
EDM (``family == "edm"`` with ``prediction=edm``) is ``EDMEulerScheduler``, whose
preconditioning (c_in, c_noise = ¼ ln σ, c_skip, c_out of Karras et al. Table 1) is ours. Other
families have no diffusers scheduler with their network's time label; their U-Net still
exports, with a note of what is missing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from diffusion.errors import ConfigError
from diffusion.processes import schedules

PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
VARIANCE_TYPES = {"beta": "fixed_large", "beta_tilde": "fixed_small"}
NAMED_TOLERANCE = 1e-12  # relative: ours equals diffusers' formula up to float64 rounding


def _sigmoid_ends(beta: torch.Tensor) -> tuple[float, float]:
    """(beta_start, beta_end) of diffusers' sigmoid schedule through beta[0] and beta[-1]."""
    low, high = torch.sigmoid(torch.tensor([-6.0, 6.0], dtype=torch.float64)).tolist()
    span = (float(beta[-1]) - float(beta[0])) / (high - low)
    start = float(beta[0]) - span * low
    return start, start + span


def named_betas(name: str, T: int, start: float, end: float) -> torch.Tensor:
    """diffusers' ``beta_schedule`` formulas (DDPMScheduler), in float64."""
    if name == "linear":
        return torch.linspace(start, end, T, dtype=torch.float64)
    if name == "scaled_linear":
        return torch.linspace(math.sqrt(start), math.sqrt(end), T, dtype=torch.float64) ** 2
    if name == "squaredcos_cap_v2":
        return schedules.cosine(T)  # Nichol & Dhariwal's, with max_beta 0.999 as diffusers'
    if name == "sigmoid":
        return start + (end - start) * torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64))
    raise ConfigError(
        f"scheduler beta_schedule={name!r} cannot be mapped: use linear, scaled_linear, "
        "squaredcos_cap_v2, sigmoid or trained_betas"
    )


def beta_fields(beta: torch.Tensor) -> dict[str, Any]:
    """The scheduler keys that give exactly ``beta`` (float64, shape (T,))."""
    T = beta.shape[0]
    ends = {
        "linear": (float(beta[0]), float(beta[-1])),
        "scaled_linear": (float(beta[0]), float(beta[-1])),
        "squaredcos_cap_v2": (0.0001, 0.02),  # unused by the formula; diffusers' defaults
        "sigmoid": _sigmoid_ends(beta) if T > 1 else (0.0, 0.0),
    }
    for name, (start, end) in ends.items():
        if T > 1 and torch.allclose(
            named_betas(name, T, start, end), beta, rtol=NAMED_TOLERANCE, atol=0.0
        ):
            return {"beta_schedule": name, "beta_start": start, "beta_end": end,
                    "trained_betas": None}  # fmt: skip
    return {"beta_schedule": "linear", "beta_start": float(beta[0]), "beta_end": float(beta[-1]),
            "trained_betas": beta.tolist()}  # fmt: skip


def sampler_options(sampler: Mapping[str, Any]) -> dict[str, Any]:
    """A sampler node's keyword settings, its function's defaults filled in."""
    import inspect

    from hydra.utils import get_object

    fn = inspect.unwrap(get_object(sampler["_target_"]))
    defaults = {name: p.default for name, p in inspect.signature(fn).parameters.items()
                if p.default is not inspect.Parameter.empty}  # fmt: skip
    return {**defaults, **{k: v for k, v in sampler.items() if not k.startswith("_")}}


def scheduler_config(module) -> tuple[dict[str, Any] | None, list[str]]:
    """diffusers' scheduler config of the module's process (None if diffusers has none), and
    what a diffusers user must know or add."""
    process, hp = module.process, module.hparams
    prediction = hp.get("prediction", "eps")
    notes: list[str] = []
    if process.family == "ddpm" and prediction in PREDICTION_TYPES:
        sampler = dict(hp.get("sampler") or {})
        options = sampler_options(sampler)  # its settings, defaults included
        variance = options.get("variance", "beta_tilde")  # a sampler without one: DDIM's β̃
        config = {
            "_class_name": "DDPMScheduler",
            "num_train_timesteps": process.T,
            **beta_fields(process.beta64),
            "variance_type": "learned_range" if hp.get("learn_sigma") else VARIANCE_TYPES[variance],
            "clip_sample": bool(options.get("clip_x0", False)),
            "clip_sample_range": 1.0,
            "prediction_type": PREDICTION_TYPES[prediction],
            "thresholding": False,
            "timestep_spacing": "leading",
            "steps_offset": 0,
            "rescale_betas_zero_snr": False,
        }
        return config, notes
    if process.family == "edm" and prediction == "edm":
        notes.append(
            "no diffusers pipeline samples an EDM model: run UNet2DModel with EDMEulerScheduler "
            "(scheduler/), calling scheduler.scale_model_input(x, t) before the network and "
            "scheduler.step(output, t, x) after; its timesteps are c_noise = ln(sigma) / 4, ours"
        )
        config = {
            "_class_name": "EDMEulerScheduler",
            "sigma_min": process.sigma_min,
            "sigma_max": process.sigma_max,
            "sigma_data": float(hp.get("sigma_data", 0.5)),
            "sigma_schedule": "karras",
            "num_train_timesteps": process.T,
            "prediction_type": "epsilon",  # EDM's c_out = σ σ_data / √(σ² + σ_data²)
            "rho": 7.0,
            "final_sigmas_type": "zero",
        }
        return config, notes
    notes.append(
        f"diffusers has no scheduler for process={process.family} with "
        f"module.prediction={prediction}: only unet/ is written; the network's time input is "
        f"our process's label(t), its output our {prediction} target (diffusion.processes; "
        "diffusion_lab.json holds the process)"
    )
    return None, notes


def process_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The module settings (schedule, T, prediction, learn_sigma, sampler) of a diffusers DDPM
    or DDIM scheduler config; ConfigError naming a key we cannot represent."""
    kind = config.get("_class_name", "DDPMScheduler")
    if kind not in ("DDPMScheduler", "DDIMScheduler"):
        raise ConfigError(
            f"scheduler _class_name={kind!r} cannot be mapped onto our processes: use a folder "
            "with a DDPMScheduler or DDIMScheduler"
        )
    refused = {"thresholding": False, "rescale_betas_zero_snr": False, "clip_sample_range": 1.0}
    for key, value in refused.items():
        if config.get(key, value) != value:
            raise ConfigError(
                f"scheduler {key}={config[key]!r} is not supported: it must be {value!r}"
            )
    T = int(config.get("num_train_timesteps", 1000))
    if config.get("trained_betas") is not None:
        beta = torch.tensor(config["trained_betas"], dtype=torch.float64)
        if beta.shape != (T,):
            raise ConfigError(
                f"scheduler trained_betas has {beta.numel()} values, num_train_timesteps={T}"
            )
    else:
        name = config.get("beta_schedule", "linear")
        beta = named_betas(name, T, config.get("beta_start", 1e-4), config.get("beta_end", 0.02))
    prediction = {v: k for k, v in PREDICTION_TYPES.items()}.get(
        config.get("prediction_type", "epsilon")
    )
    if prediction is None:
        raise ConfigError(
            f"scheduler prediction_type={config['prediction_type']!r} cannot be mapped: use "
            f"{sorted(PREDICTION_TYPES.values())}"
        )
    variance_type = config.get("variance_type", "fixed_small")
    variances = {
        "fixed_small": "beta_tilde", "fixed_small_log": "beta_tilde", "fixed_large": "beta",
        "fixed_large_log": "beta", "learned_range": "beta",
    }  # fmt: skip
    if variance_type not in variances:
        raise ConfigError(
            f"scheduler variance_type={variance_type!r} cannot be mapped: use {sorted(variances)}"
        )
    return {
        "schedule": {"_target_": "diffusion.processes.schedules.tabulated", "_partial_": True,
                     "beta": beta.tolist()},
        "T": T,
        "prediction": prediction,
        "learn_sigma": variance_type == "learned_range",
        "sampler": {"_target_": "diffusion.samplers.chain.ddpm_ancestral", "_partial_": True,
                    "variance": variances[variance_type],
                    "clip_x0": bool(config.get("clip_sample", True))},
    }  # fmt: skip
