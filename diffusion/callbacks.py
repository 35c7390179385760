"""Training callbacks: non-essential work kept out of the LightningModule."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torchvision.utils import make_grid, save_image

from diffusion import plots


def to_grid(images: torch.Tensor, nrow: int | None = None) -> torch.Tensor:
    """Images in [-1, 1], (N, C, H, W) -> one float grid in [0, 1], (C, H', W')."""
    nrow = nrow or max(1, int(images.shape[0] ** 0.5))
    return make_grid((images.float().cpu() + 1) / 2, nrow=nrow, padding=1, pad_value=1.0).clamp(
        0, 1
    )


def log_image(trainer: Trainer, key: str, grid: torch.Tensor, step: int) -> None:
    """Send a (C, H, W) image in [0, 1] to every image-capable logger of ``trainer``."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[grid], step=step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, grid, global_step=step)


class SampleGrid(Callback):
    """Every ``every_n_steps`` optimizer steps and at the end of training, sample ``n`` images
    with the EMA weights from a fixed seed, save ``{dirpath}/step_{step:06d}.png`` (and
    ``final.png`` at the end) and log the grid as ``samples`` to the active loggers.

    From the same sampling run, the reverse trajectory of the first ``strip_n`` samples at
    ``strip_steps`` evenly spaced steps (x_t above the predicted x̂_0) is saved as
    ``denoise_<name>.png`` and logged as ``denoising`` (``strip_n=0`` turns it off).
    """

    def __init__(
        self,
        dirpath: str,
        n: int = 64,
        every_n_steps: int = 1000,
        seed: int = 0,
        strip_n: int = 4,
        strip_steps: int = 10,
    ) -> None:
        super().__init__()
        if n < 1 or not 0 <= strip_n <= n:
            raise ValueError(f"SampleGrid needs n >= 1 and 0 <= strip_n <= n, got {n}, {strip_n}")
        self.dirpath = Path(dirpath)
        self.n = n
        self.every_n_steps = every_n_steps
        self.seed = seed
        self.strip_n = strip_n
        self.strip_steps = strip_steps
        self.last_path: Path | None = None
        self._drawn_at = (
            -1
        )  # global step of the last grid (batches share a step under accumulation)

    @rank_zero_only
    def _draw(self, trainer: Trainer, module: LightningModule, name: str) -> None:
        self._drawn_at = trainer.global_step
        recorder = plots.TrajectoryRecorder(k=self.strip_n)
        generator = torch.Generator().manual_seed(self.seed)
        images = module.sample(
            self.n, generator=generator, callback=recorder if self.strip_n else None
        )
        grid = to_grid(images)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        path = self.dirpath / f"{name}.png"
        save_image(grid, path)
        self.last_path = path
        log_image(trainer, "samples", grid, trainer.global_step)
        if self.strip_n:
            title = f"Reverse process at step {trainer.global_step} (EMA)"
            fig = plots.denoising_strip(recorder, self.strip_steps, title)
            fig.savefig(self.dirpath / f"denoise_{name}.png", dpi=plots.DPI)
            log_image(trainer, "denoising", plots.figure_to_tensor(fig), trainer.global_step)

    def on_train_batch_end(self, trainer: Trainer, module: LightningModule, *args) -> None:
        step = trainer.global_step
        due = self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0
        if due and step != self._drawn_at:
            self._draw(trainer, module, f"step_{step:06d}")

    def on_train_end(self, trainer: Trainer, module: LightningModule) -> None:
        self._draw(trainer, module, "final")


class SchedulePlot(Callback):
    """At the start of training, plot the run's β_t, ᾱ_t, √ᾱ_t and log-SNR(t), save
    ``{dirpath}/schedule.png`` and log it as ``schedule`` to the active loggers."""

    def __init__(self, dirpath: str) -> None:
        super().__init__()
        self.dirpath = Path(dirpath)

    @rank_zero_only
    def on_train_start(self, trainer: Trainer, module: LightningModule) -> None:
        name = module.hparams.schedule["_target_"].rsplit(".", 1)[-1]
        curves = {name: plots.schedule_curves(module.process.beta64)}
        fig = plots.plot_schedules(curves, module.process.T)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        fig.savefig(self.dirpath / "schedule.png", dpi=plots.DPI)
        log_image(trainer, "schedule", plots.figure_to_tensor(fig), trainer.global_step)
