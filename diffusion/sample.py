"""Draw samples from a checkpoint: ``python -m diffusion.sample ckpt=<path> [sampler=ddim
sampler.steps=50] n=64 seed=0``.

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
from tqdm import tqdm

from diffusion import plots
from diffusion.allocator import keep_freed_memory
from diffusion.callbacks import to_grid
from diffusion.checkpoints import load_module
from diffusion.errors import ConfigError, exit_on_user_error


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats (N, C, H, W) -> uint8 [0, 255], same layout."""
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class NFECounter:
    """Sampler callback: counts network evaluations and advances a progress bar."""

    def __init__(self, bar: tqdm | None = None, then=None) -> None:
        self.nfe = 0
        self.bar = bar
        self.then = then

    def __call__(self, step) -> None:
        self.nfe = step.nfe
        if self.bar is not None:
            self.bar.set_postfix(nfe=step.nfe, refresh=False)
        if self.then is not None:
            self.then(step)


def draw(
    module,
    n: int,
    batch_size: int,
    seed: int,
    sampler,
    use_ema: bool = True,
    strip: plots.TrajectoryRecorder | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, int]:
    """``n`` samples in [-1, 1] on the CPU, in batches, from one seed; returns them and the NFE
    per sample. ``strip`` records the trajectory of the first batch."""
    generator = torch.Generator().manual_seed(seed)
    batches, nfe = [], 0
    sizes = [min(batch_size, n - i) for i in range(0, n, batch_size)]
    bar = tqdm(sizes, desc="sampling", unit="batch", disable=not progress)
    for i, size in enumerate(bar):
        counter = NFECounter(bar, then=strip if i == 0 else None)
        batches.append(
            module.sample(
                size, generator=generator, use_ema=use_ema, callback=counter, sampler=sampler
            ).cpu()
        )
        nfe = counter.nfe
    return torch.cat(batches), nfe


def run(cfg: DictConfig) -> dict:
    """Sample as configured; returns the info written to ``info.json``."""
    if OmegaConf.is_missing(cfg, "ckpt"):
        raise ConfigError("which checkpoint? give ckpt=outputs/runs/<run>/checkpoints/last.ckpt")
    if cfg.n < 1 or cfg.batch_size < 1:
        raise ConfigError(
            f"n and batch_size must be >= 1, got n={cfg.n}, batch_size={cfg.batch_size}"
        )
    device = pick_device(cfg.device)
    if cfg.get("keep_freed_memory") and device.type == "cpu":
        keep_freed_memory()  # diffusion/allocator.py
    module = load_module(cfg.ckpt, device)
    sampler = OmegaConf.to_container(cfg.sampler, resolve=True) if cfg.get("sampler") else None
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    strip = (
        plots.TrajectoryRecorder(k=min(cfg.strip_n, cfg.n, cfg.batch_size)) if cfg.strip_n else None
    )
    start = time.perf_counter()
    images, nfe = draw(module, cfg.n, cfg.batch_size, cfg.seed, sampler, cfg.use_ema, strip)
    seconds = time.perf_counter() - start
    pixels = to_uint8(images)
    np.savez(out / "samples.npz", images=pixels.permute(0, 2, 3, 1).numpy())
    save_image(to_grid(images[: cfg.grid_max]), out / "grid.png")
    if cfg.save_images:
        (out / "images").mkdir(exist_ok=True)
        for i, img in enumerate(pixels):
            save_image(img.float() / 255, out / "images" / f"{i:06d}.png")
    if strip is not None:
        fig = plots.denoising_strip(strip, cfg.strip_steps, f"x_T → x_0 ({Path(cfg.ckpt).name})")
        fig.savefig(out / "denoise.png", dpi=plots.DPI)
    info = {
        "ckpt": str(Path(cfg.ckpt).resolve()),
        "sampler": sampler or module.hparams.sampler,
        "nfe": nfe,
        "n": cfg.n,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "use_ema": cfg.use_ema,
        "seconds": round(seconds, 3),
        "device": str(module.device),
    }
    (out / "info.json").write_text(json.dumps(info, indent=2))
    return info


@hydra.main(config_path="conf", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        info = run(cfg)
    print(f"{info['n']} samples, NFE {info['nfe']}, {info['seconds']:.1f} s -> {cfg.out_dir}")


if __name__ == "__main__":
    main()
