"""Export a checkpoint as a diffusers pipeline folder: ``python -m diffusion.export
ckpt=<path> out=DIR [use_ema=false] [overwrite=true]``.

``DDPMPipeline.from_pretrained(DIR)`` (or ``DDIMPipeline``) then samples it: ``model_index.json``,
``unet/`` (config and safetensors weights, EMA by default), ``scheduler/`` (the exact β,
prediction and variance type), a model card ``README.md`` and ``diffusion_lab.json``
(diffusion.interchange.folder). What diffusers cannot hold (a family without a diffusers
scheduler, class labels) is exported as far as it can be, and printed: what a user must add.
The folder is written beside ``out`` and renamed into place, so nothing is half-written.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from diffusion.checkpoints import checkpoint_id, load_module
from diffusion.config import NODE, Field, check_fields
from diffusion.errors import ConfigError, exit_on_user_error

FIELDS = {
    "ckpt": Field("checkpoint"), "out": Field("dir"), "overwrite": Field("bool"),
    "use_ema": Field("bool"), "trust_checkpoint": Field("bool"), "device": Field("device"),
    "paths": NODE,
}  # fmt: skip
"""The top-level keys of ``python -m diffusion.export``."""


def run_metrics(ckpt: str) -> dict | None:
    """The run's final metrics (``result.json`` beside its ``checkpoints/`` folder), if any."""
    if ckpt.startswith("diffusers:"):
        return None
    result = Path(ckpt).expanduser().resolve().parent.parent / "result.json"
    try:
        values = json.loads(result.read_text())
    except (OSError, ValueError):
        return None
    metrics = values.get("metrics", values) if isinstance(values, dict) else None
    return {k: v for k, v in (metrics or {}).items() if isinstance(v, int | float | str)} or None


def run(cfg: DictConfig) -> list[str]:
    """Export as configured; returns the notes printed for diffusers users."""
    from diffusion.interchange.folder import export

    for key in ("ckpt", "out"):
        if OmegaConf.is_missing(cfg, key):
            raise ConfigError(f"{key}= is required: python -m diffusion.export ckpt=<path> out=DIR")
    check_fields(cfg, FIELDS, "export")
    module = load_module(cfg.ckpt, cfg.device, trust=cfg.trust_checkpoint)
    return export(module, cfg.out, cfg.use_ema, cfg.overwrite, checkpoint_id(cfg.ckpt),
                  run_metrics(cfg.ckpt))  # fmt: skip


@hydra.main(config_path="conf", config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        notes = run(cfg)
    print(f"exported {cfg.ckpt} -> {cfg.out}")
    for note in notes:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
