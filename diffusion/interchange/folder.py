"""diffusers' pipeline folders: write one from a module (export), build a module from one (import).

A folder holds ``model_index.json`` (when a diffusers pipeline can run the model as it is),
``unet/config.json`` with ``unet/diffusion_pytorch_model.safetensors``, ``scheduler/
scheduler_config.json``, a model card ``README.md``, and ``diffusion_lab.json``: our module's
settings that diffusers cannot hold (the process of a family diffusers has no scheduler for, class
names, the null class), so that export → import gives the same module back. A folder from
elsewhere is read through its scheduler config (diffusion.interchange.scheduler). Weights are
read from safetensors, or from a ``.bin`` with ``torch.load(weights_only=True)``: never code.

``ckpt=diffusers:<folder or hub id>``: a hub id (``google/ddpm-cifar10-32``) is downloaded with
huggingface_hub, which needs the network; offline, pass the downloaded folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from diffusion.errors import ConfigError, UserError
from diffusion.interchange import scheduler as S
from diffusion.interchange import unet as U

PREFIX = "diffusers:"
MARKER = "diffusion_lab.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
EXTRA = "pip install -e '.[diffusers]'"
DEFAULT_OPTIMIZER = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 2e-4}


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise UserError(
            f"reading and writing diffusers folders needs safetensors: {EXTRA}"
        ) from None
    return safetensors.torch


# ----- export ------------------------------------------------------------------------------


def export(module, out: str | Path, use_ema: bool = True, overwrite: bool = False,
           source: str = "", metrics: dict | None = None) -> list[str]:  # fmt: skip
    """Write the module as a diffusers folder at ``out`` (atomically: a temporary folder beside
    it, renamed into place); returns what a diffusers user must know or add."""
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(
            f"out={str(out)!r} already holds files; choose an empty or new folder, or add "
            "overwrite=true to replace it"
        )
    hp = dict(module.hparams)
    net = module.ema.module if use_ema else module.net
    if module.text:
        raise ConfigError(
            "a text-conditional model (text_encoder=) cannot be exported: its cross-attention "
            "U-Net and text encoder have no UNet2DModel equivalent"
        )
    unet_config = U.unet_config(hp["net"], net)
    scheduler, notes = S.scheduler_config(module)
    weights = U.to_diffusers(net.state_dict())
    if module.num_classes:
        notes.append(
            f"class-conditional: pass class_labels in 0..{module.num_classes - 1} to the UNet "
            f"({module.num_classes} is the null class; classifier-free guidance w is "
            "(1 + w) eps(x, c) - w eps(x, null), diffusers' guidance_scale = 1 + w); "
            "DDPMPipeline cannot, so there is no model_index.json"
        )
    runnable = scheduler is not None and scheduler["_class_name"] == "DDPMScheduler"
    runnable = runnable and not module.num_classes
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "unet").mkdir()
        _write_json(tmp / "unet" / "config.json", unet_config)
        _safetensors().save_file(weights, str(tmp / "unet" / WEIGHTS), metadata={"format": "pt"})
        if scheduler is not None:
            (tmp / "scheduler").mkdir()
            _write_json(tmp / "scheduler" / "scheduler_config.json", scheduler)
        if runnable:
            _write_json(tmp / "model_index.json", {
                "_class_name": "DDPMPipeline",
                "scheduler": ["diffusers", "DDPMScheduler"],
                "unet": ["diffusers", "UNet2DModel"],
            })  # fmt: skip
        marker = {"format": 1, "module": _jsonable(hp), "class_names": module.class_names,
                  "weights": "ema" if use_ema else "raw", "source": source}  # fmt: skip
        _write_json(tmp / MARKER, marker)
        card = model_card(module, marker, notes, metrics, runnable)
        (tmp / "README.md").write_text(card)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return notes


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=list))


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished folder ``tmp`` to ``out``; an old ``out`` is removed only after."""
    os.chmod(tmp, 0o777 & ~_umask())
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
    os.replace(out, old / "previous")
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def model_card(module, marker: dict, notes: list[str], metrics: dict | None, runnable: bool) -> str:
    """README.md beside the weights: the training config, the data and the metrics."""
    hp = marker["module"]
    net = hp["net"]
    data = hp.get("data") or {}
    data_name = data.get("dataset") or str(data.get("_target_", "unknown")).rsplit(".", 1)[-1]
    lines = [
        "---",
        "library_name: diffusers",
        "tags: [unconditional-image-generation, diffusion-lab]"
        if not module.num_classes
        else "tags: [class-conditional-image-generation, diffusion-lab]",
        "---",
        "",
        f"# {Path(marker['source']).name or 'model'} (diffusion-lab export)",
        "",
        "Exported by `python -m diffusion.export` from a checkpoint of diffusion-lab "
        f"(`{marker['source']}`), {marker['weights'].upper()} weights.",
        "",
        "## Training configuration",
        f"- process: `{module.process.family}`, T = {module.process.T}, prediction target "
        f"`{hp.get('prediction', 'eps')}`, learned variance: {bool(hp.get('learn_sigma'))}",
        f"- schedule: `{json.dumps(hp.get('schedule'))[:200]}`",
        f"- U-Net: width {net.get('width')}, channel_mult {net.get('channel_mult')}, "
        f"{net.get('num_res_blocks')} blocks per level, attention at levels "
        f"{net.get('attention_levels')}, dropout {net.get('dropout')}",
        f"- classes: {module.class_names or module.num_classes or 'none (unconditional)'}",
        f"- data: `{data_name}` ({', '.join(f'{k}={v}' for k, v in data.items() if k in ('image_size', 'channels', 'root'))}), "  # noqa: E501
        f"image shape {hp.get('image_shape')}",
        f"- the full module configuration is in `{MARKER}`",
        "",
        "## Metrics",
    ]
    if metrics:
        lines += [f"- {k}: {v}" for k, v in metrics.items()]
    else:
        lines.append(
            "- none recorded with the checkpoint (measure with python -m diffusion.evaluate)"
        )
    lines += ["", "## Use"]
    if runnable:
        lines += [
            "```python",
            "from diffusers import DDPMPipeline  # or DDIMPipeline",
            "pipe = DDPMPipeline.from_pretrained('<this folder>')",
            "images = pipe(batch_size=16).images",
            "```",
        ]
    lines += [f"- {note}" for note in notes]
    lines += ["- with diffusion-lab: `python -m diffusion.sample ckpt=diffusers:<this folder>`", ""]
    return "\n".join(lines)


# ----- import ------------------------------------------------------------------------------


def resolve(spec: str) -> Path:
    """The local folder of ``diffusers:<folder or hub id>``, downloading a hub id."""
    name = spec[len(PREFIX) :] if spec.startswith(PREFIX) else spec
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if not name or path.exists() or name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise ConfigError(f"no folder {name!r} here, and it is not a hub id (owner/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(
            f"{name!r} is a hub id; downloading it needs huggingface_hub: {EXTRA}"
        ) from None
    try:
        return Path(snapshot_download(
            name, allow_patterns=["*.json", "unet/*.safetensors", "unet/*.bin", "*.md"]
        ))  # fmt: skip
    except Exception as err:  # offline, unknown repo, no access: one line
        raise UserError(
            f"{name!r} is not a folder here and cannot be downloaded from the hub "
            f"({type(err).__name__}); where there is network, `huggingface-cli download {name} "
            f"--local-dir DIR`, then ckpt=diffusers:DIR"
        ) from None


def read(folder: Path) -> tuple[dict, dict | None, dict | None, dict[str, torch.Tensor]]:
    """(unet config, scheduler config, our marker, the UNet's weights) of a diffusers folder."""
    unet_dir = folder / "unet" if (folder / "unet").is_dir() else folder
    index = _read_json(folder / "model_index.json")
    unet_entry = (index or {}).get("unet")
    if index is not None and isinstance(unet_entry, list) and unet_entry[-1] != "UNet2DModel":
        raise ConfigError(
            f"{str(folder)!r} is a {index.get('_class_name')} with a {unet_entry[-1]}: only "
            "DDPM-style UNet2DModel weights map onto our U-Net"
        )
    config = _read_json(unet_dir / "config.json")
    if config is not None:
        U.check_kind(config)
    if config is None or "block_out_channels" not in config:
        raise ConfigError(
            f"{str(folder)!r} is not a diffusers model folder: no unet/config.json of a UNet2DModel"
        )
    marker = _read_json(folder / MARKER)
    scheduler = _read_json(folder / "scheduler" / "scheduler_config.json")
    if scheduler is None and marker is None:
        raise ConfigError(
            f"{str(folder)!r} has no scheduler/scheduler_config.json, so its noise schedule is "
            "unknown; add the scheduler config the model was trained with"
        )
    if (unet_dir / WEIGHTS).is_file():
        state = _safetensors().load_file(str(unet_dir / WEIGHTS))
    elif (unet_dir / "diffusion_pytorch_model.bin").is_file():
        try:
            state = torch.load(unet_dir / "diffusion_pytorch_model.bin", map_location="cpu",
                               weights_only=True)  # fmt: skip
        except Exception as err:
            raise UserError(f"cannot read {str(unet_dir)!r}'s weights ({type(err).__name__}): "
                            "not a plain state dict") from None  # fmt: skip
    else:
        raise ConfigError(f"{str(unet_dir)!r} has no {WEIGHTS} (or .bin) weights")
    return config, scheduler, marker, state


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{str(path)!r} is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{str(path)!r} does not hold a JSON object")
    return value


def module_settings(spec: str) -> tuple[dict, dict[str, torch.Tensor], list[str] | None]:
    """The DiffusionModule arguments, our U-Net's weights and the class names of
    ``diffusers:<folder or hub id>``; ConfigError naming what cannot be mapped."""
    folder = resolve(spec)
    config, scheduler, marker, state = read(folder)
    if marker is not None:  # ours: the module as exported
        hparams = dict(marker["module"])
        hparams["net"] = U.net_config(config, hparams["net"].get("num_classes", 0))
        class_names = marker.get("class_names")
    else:
        settings = S.process_settings(scheduler)
        channels = int(config.get("in_channels", 3))
        out = int(config.get("out_channels", channels))
        if out != (2 * channels if settings["learn_sigma"] else channels):
            raise ConfigError(
                f"unet out_channels={out} does not fit scheduler variance_type="
                f"{scheduler.get('variance_type', 'fixed_small')!r} ({channels} image channels)"
            )
        net = U.net_config(config)
        hparams = {
            **settings, "net": net, "image_shape": [channels, net["image_size"], net["image_size"]],
            "optimizer": DEFAULT_OPTIMIZER, "ema_decay": 0.9999,
        }  # fmt: skip
        class_names = None
    return hparams, U.from_diffusers(state), class_names


def load(spec: str, device: torch.device | str = "cpu"):
    """The DiffusionModule of ``diffusers:<folder or hub id>`` (EMA and raw weights both the
    folder's), in eval mode on ``device``."""
    from diffusion.training.module import DiffusionModule

    hparams, state, class_names = module_settings(spec)
    try:
        module = DiffusionModule(**hparams)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"the model cannot be built here: {err}") from None
    module.load_network(state)
    module.class_names = class_names
    return module.to(device).eval()
