"""Draw samples from a checkpoint: ``python -m diffusion.sample ckpt=<path> [sampler=ddim
sampler.steps=50] n=64 seed=0``; from a class-conditional one, ``labels=[3,3,7] guidance=2``
(one image per label) or ``labels=all n=8`` (n per class), grid.png then one row per class;
from a text-conditional one, ``prompt="a thin seven" guidance=3 n=16`` or ``prompts_file=F``
(one prompt per line, n images each), grid.png then one row per prompt.

Writes to the run directory (``outputs/samples/<time>/``, or ``out_dir=``):
``grid.png`` (the first ``grid_max`` samples), ``samples.npz`` (``images``: uint8
(n, H, W, C), the layout of improved-diffusion's sample files), ``images/<i>.png`` with
``save_images=true``, ``denoise.png`` (x_T → x_0 of the first ``strip_n`` samples with the
predicted x̂_0 below) and ``info.json`` (checkpoint, sampler, NFE, seed, time).
EMA weights by default (``use_ema=false`` for the raw ones). The same seed, ``n`` and
``batch_size`` give identical files.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torchvision.utils import save_image

from diffusion.allocator import keep_freed_memory
from diffusion.checkpoints import CHECKPOINT_FIELDS, checkpoint_id, load_checkpoint, pick_device
from diffusion.config import Field, check_fields
from diffusion.errors import ConfigError, exit_on_user_error
from diffusion.evaluation import plots
from diffusion.evaluation.draw import draw, to_uint8

FIELDS = {
    **CHECKPOINT_FIELDS, "n": Field("int", 1), "batch_size": Field("int", 1),
    "grid_max": Field("int", 1), "save_images": Field("bool"), "strip_n": Field("int", 0),
    "strip_steps": Field("int", 1), "labels": Field("labels", nullable=True),
    "guidance": Field("float", 0), "prompt": Field("str", nullable=True),
    "prompts_file": Field("file", nullable=True),
}  # fmt: skip
"""The top-level keys of ``python -m diffusion.sample``."""


def run(cfg: DictConfig) -> dict:
    """Sample as configured; returns the info written to ``info.json``."""
    if OmegaConf.is_missing(cfg, "ckpt"):
        raise ConfigError("which checkpoint? give ckpt=outputs/runs/<run>/checkpoints/last.ckpt")
    check_fields(cfg, FIELDS, "sample")
    device = pick_device(cfg.device)
    if cfg.get("keep_freed_memory") and device.type == "cpu":
        keep_freed_memory()  # diffusion/allocator.py
    module = load_checkpoint(cfg, device)
    prompts = requested_prompts(cfg, module)
    if prompts is None:
        labels, names = requested_labels(cfg, module), module.class_names
    else:  # one row per prompt: the prompt's index is the image's "label" in the grid
        labels, names = torch.arange(len(prompts)).repeat_interleave(cfg.n), prompts
    per_image = None if prompts is None else [prompts[i] for i in labels.tolist()]
    n = cfg.n if labels is None else len(labels)
    sampler = OmegaConf.to_container(cfg.sampler, resolve=True) if cfg.get("sampler") else None
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    strip = plots.TrajectoryRecorder(k=min(cfg.strip_n, n, cfg.batch_size)) if cfg.strip_n else None
    start = time.perf_counter()
    images, nfe = draw(module, n, cfg.batch_size, cfg.seed, sampler, cfg.use_ema, strip,
                       labels=None if prompts else labels, guidance=cfg.guidance,
                       prompts=per_image)  # fmt: skip
    seconds = time.perf_counter() - start
    pixels = to_uint8(images)
    conditions = {} if labels is None else {"labels": labels.numpy()}
    if per_image is not None:
        conditions = {"prompts": np.array(per_image)}
    np.savez(out / "samples.npz", images=pixels.permute(0, 2, 3, 1).numpy(), **conditions)
    if labels is None:
        grid = plots.to_grid(images[: cfg.grid_max])
        save_image(plots.upscale(grid, plots.VIEW_SIDE), out / "grid.png")
    else:
        title = f"{Path(cfg.ckpt).name}, guidance w = {cfg.guidance:g}"
        shown = slice(0, cfg.grid_max)
        fig = plots.class_grid(images[shown], labels[shown], names, title)
        fig.savefig(out / "grid.png", dpi=plots.DPI)
    if cfg.save_images:
        (out / "images").mkdir(exist_ok=True)
        for i, img in enumerate(pixels):
            save_image(img.float() / 255, out / "images" / f"{i:06d}.png")
    if strip is not None:
        title = f"x_T → x_0 ({Path(cfg.ckpt).name})"
        fig = plots.denoising_strip(strip, cfg.strip_steps, title, module.process.time_text)
        fig.savefig(out / "denoise.png", dpi=plots.DPI)
    info = {
        "ckpt": checkpoint_id(cfg.ckpt),
        "sampler": sampler or module.hparams.sampler,
        "nfe": nfe,
        "n": n,
        "labels": None if labels is None or prompts else labels.tolist(),
        "prompts": prompts,
        "guidance": cfg.guidance,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "use_ema": cfg.use_ema,
        "seconds": round(seconds, 3),
        "device": str(module.device),
    }
    (out / "info.json").write_text(json.dumps(info, indent=2))
    return info


def requested_prompts(cfg: DictConfig, module) -> list[str] | None:
    """The prompts asked for (``prompt=`` or ``prompts_file=``, one per line), or None; a
    ConfigError for prompts the checkpoint cannot take, or labels or guidance without them."""
    prompt, file = cfg.get("prompt"), cfg.get("prompts_file")
    if prompt is not None and file is not None:
        raise ConfigError(f"prompt={prompt!r} and prompts_file={file!r}: give one of them")
    if prompt is None and file is None:
        if module.text and cfg.get("labels") is not None:
            raise ConfigError(
                f"labels={OmegaConf.to_container(cfg.labels)!r} needs a class-conditional "
                f'checkpoint; {Path(cfg.ckpt).name} takes prompts: prompt="…" or prompts_file='
            )
        if module.text and cfg.guidance:
            raise ConfigError(
                f"guidance={cfg.guidance:g} needs prompt= or prompts_file= (what to draw); an "
                "unconditional draw uses the empty prompt and is not guided"
            )
        return None
    key, value = ("prompt", prompt) if prompt is not None else ("prompts_file", file)
    if not module.text:
        raise ConfigError(
            f"{key}={value!r} needs a text-conditional checkpoint; {Path(cfg.ckpt).name} was "
            "trained without text (text_encoder=null)"
        )
    if cfg.get("labels") is not None:
        raise ConfigError(f"labels= and {key}= cannot be combined: a text model takes prompts")
    prompts = [prompt] if prompt is not None else [
        line.strip() for line in Path(file).expanduser().read_text().splitlines() if line.strip()
    ]  # fmt: skip
    if not prompts:
        raise ConfigError(f"prompts_file={file!r} holds no prompt (one per line)")
    return prompts


def requested_labels(cfg: DictConfig, module) -> torch.Tensor | None:
    """The class of each image to draw (``labels=all``: ``n`` per class), or None for an
    unconditional draw; a ConfigError for labels or guidance the checkpoint cannot take."""
    k, labels = module.num_classes, cfg.get("labels")
    if not k:
        if labels is not None or cfg.guidance:
            key = "labels" if labels is not None else "guidance"
            value = OmegaConf.to_container(labels) if key == "labels" else cfg.guidance
            raise ConfigError(
                f"{key}={value!r} needs a class-conditional checkpoint; {Path(cfg.ckpt).name} was "
                "trained without classes (model.num_classes=0)"
            )
        return None
    if labels is None:
        if cfg.guidance:
            raise ConfigError(
                f"guidance={cfg.guidance:g} needs labels= (the classes to draw); an unconditional "
                "draw from a class-conditional model uses the null class and is not guided"
            )
        return None
    if labels == "all":
        return torch.arange(k).repeat_interleave(cfg.n)
    outside = sorted({int(c) for c in labels if c >= k})
    if outside:
        names = ", ".join(f"{i}={name}" for i, name in enumerate(module.class_names or []))
        raise ConfigError(
            f"labels={OmegaConf.to_container(labels)!r} is invalid: {outside} outside this "
            f"checkpoint's classes 0..{k - 1}" + (f" ({names})" if names else "")
        )
    return torch.tensor(list(labels), dtype=torch.long)


@hydra.main(config_path="conf", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        info = run(cfg)
    print(f"{info['n']} samples, NFE {info['nfe']}, {info['seconds']:.1f} s -> {cfg.out_dir}")


if __name__ == "__main__":
    main()
