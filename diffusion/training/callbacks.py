"""Training callbacks: non-essential work kept out of the LightningModule."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torchvision.utils import save_image

from diffusion.evaluation import plots
from diffusion.evaluation.draw import balanced_labels

log = logging.getLogger(__name__)


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

    A class-conditional model draws the grid per class, class-major
    (diffusion.evaluation.draw.balanced_labels): one row per class, labelled with the names; a
    text-conditional one, one row per prompt, the first distinct captions of the validation
    set (at most ``max_prompts``), labelled with them.
    """

    def __init__(
        self,
        dirpath: str,
        n: int = 64,
        every_n_steps: int = 1000,
        seed: int = 0,
        strip_n: int = 4,
        strip_steps: int = 10,
        max_prompts: int = 8,
    ) -> None:
        super().__init__()
        self.max_prompts = max_prompts
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

    def _draw(self, trainer: Trainer, module: LightningModule, name: str) -> None:
        """Every rank samples its share of the grid (the initial noise of all ``n`` images comes
        from ``seed``, so a deterministic sampler gives the same grid at any world size); rank
        0 gathers, writes and logs."""
        self._drawn_at = trainer.global_step
        world, rank = trainer.world_size, trainer.global_rank
        x_T = torch.randn(
            (self.n, *module.image_shape), generator=torch.Generator().manual_seed(self.seed)
        )
        names = self._conditions(trainer, module)
        labels = balanced_labels(self.n, len(names or ()), grouped=True)
        share = -(-self.n // world)  # ceil: every rank samples as many (padding), for all_gather
        mine = x_T[rank::world]
        mine = torch.cat([mine, x_T[: share - len(mine)]]) if len(mine) < share else mine
        my_labels = None
        if labels is not None:
            my_labels = labels[rank::world]
            my_labels = torch.cat([my_labels, labels[: share - len(my_labels)]])
        recorder = plots.TrajectoryRecorder(k=min(self.strip_n, share)) if self.strip_n else None
        generator = torch.Generator().manual_seed(self.seed + rank)  # the sampler's own noise
        condition = {}
        if my_labels is not None:
            condition = ({"prompts": [names[i] for i in my_labels.tolist()]} if module.text
                         else {"labels": my_labels})  # fmt: skip
        images = module.sample(share, generator=generator, callback=recorder, x_T=mine,
                               **condition)  # fmt: skip
        if world > 1:
            gathered = trainer.strategy.all_gather(images)  # (world, share, C, H, W)
            images = gathered.transpose(0, 1).reshape(-1, *images.shape[1:])[: self.n]
        if rank != 0:
            return
        grid = plots.to_grid(images.cpu())
        self.dirpath.mkdir(parents=True, exist_ok=True)
        path = self.dirpath / f"{name}.png"
        if labels is None:
            save_image(plots.upscale(grid, plots.VIEW_SIDE), path)
        else:
            kind = "prompt" if module.text else "class"
            title = f"Samples per {kind} at step {trainer.global_step} (EMA)"
            fig = plots.class_grid(images.cpu(), labels, names, title)
            fig.savefig(path, dpi=plots.DPI)
            grid = plots.figure_to_tensor(fig)
        self.last_path = path
        log_image(trainer, "samples", grid, trainer.global_step)
        if recorder is not None:
            title = f"Reverse process at step {trainer.global_step} (EMA)"
            fig = plots.denoising_strip(recorder, self.strip_steps, title, module.process.time_text)
            fig.savefig(self.dirpath / f"denoise_{name}.png", dpi=plots.DPI)
            log_image(trainer, "denoising", plots.figure_to_tensor(fig), trainer.global_step)

    def _conditions(self, trainer: Trainer, module: LightningModule) -> list[str] | None:
        """The row names: the classes, the prompts (validation captions), or None."""
        if module.num_classes:
            return module.class_names or [str(c) for c in range(module.num_classes)]
        if not module.text:
            return None
        val = getattr(trainer.datamodule, "val_set", None) if trainer.datamodule else None
        if val is None:
            return [""]
        # (image, caption) pairs: indexed (a folder) or streamed (webdataset); a few scanned
        items = (val[i] for i in range(len(val))) if hasattr(val, "__len__") else iter(val)
        captions: list[str] = []
        for _, (_, caption) in zip(range(256), items, strict=False):
            if caption not in captions:
                captions.append(caption)
            if len(captions) == min(self.max_prompts, self.n):
                break
        return captions or [""]

    def on_train_batch_end(self, trainer: Trainer, module: LightningModule, *args) -> None:
        step = trainer.global_step
        due = self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0
        if due and step != self._drawn_at:
            self._draw(trainer, module, f"step_{step:06d}")

    def on_train_end(self, trainer: Trainer, module: LightningModule) -> None:
        self._draw(trainer, module, "final")


class SchedulePlot(Callback):
    """At the start of training, plot the run's β_t, ᾱ_t, √ᾱ_t and log-SNR(t) over its chain,
    save ``{dirpath}/schedule.png`` and log it as ``schedule`` to the active loggers. Variance
    preserving processes only (m² + σ² = 1: DDPM, the VP-SDE's chain); the others have no β."""

    def __init__(self, dirpath: str) -> None:
        super().__init__()
        self.dirpath = Path(dirpath)

    @rank_zero_only
    def on_train_start(self, trainer: Trainer, module: LightningModule) -> None:
        process = module.process
        if "chain" not in process.offers:
            log.info("no chain to plot for process=%s", process.family)
            return
        m, sigma = process.marginal(process.chain_times())
        if not torch.allclose(m**2 + sigma**2, torch.ones_like(m)):
            log.info("no β schedule to plot for process=%s (not variance preserving)",
                     process.family)  # fmt: skip
            return
        alpha_bar = m**2
        beta = 1 - alpha_bar / torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
        schedule = module.hparams.schedule["_target_"].rsplit(".", 1)[-1]
        name = schedule if process.family == "ddpm" else f"{process.family} ({process.T} steps)"
        fig = plots.plot_schedules({name: plots.schedule_curves(beta)}, process.T)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        fig.savefig(self.dirpath / "schedule.png", dpi=plots.DPI)
        log_image(trainer, "schedule", plots.figure_to_tensor(fig), trainer.global_step)


class FIDCallback(Callback):
    """Every ``every_n_steps`` optimizer steps, ``n`` EMA samples with a fast ``sampler`` and their
    FID (and KID) against the first ``reference_n`` training images, logged as ``val/fid`` and
    ``val/kid``.

    Under DDP each rank draws its share with its own seed; the features are gathered, so every
    rank computes the same number once from all ``n`` samples. Reference features are computed
    once per dataset and resolution and cached in ``cache_dir``. ``extractor`` is a config of the
    feature network (default: FID Inception, diffusion.metrics); when its weights are missing
    and ``skip_without_weights`` is set, the callback turns itself off with a warning.
    A class-conditional model draws class-balanced labels (``balanced_labels``), unguided.
    """

    def __init__(
        self,
        every_n_steps: int = 5000,
        n: int = 1000,
        batch_size: int = 250,
        sampler: dict | None = None,
        reference_n: int = 10000,
        extractor: dict | None = None,
        cache_dir: str = ".cache",
        kid: bool = True,
        skip_without_weights: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.every_n_steps = every_n_steps
        self.n = n
        self.batch_size = batch_size
        self.sampler = dict(sampler) if sampler else None
        self.reference_n = reference_n
        self.extractor_cfg = dict(extractor or {"_target_": "diffusion.metrics.InceptionFeatures"})
        self.cache_dir = cache_dir
        self.kid = kid
        self.skip_without_weights = skip_without_weights
        self.seed = seed
        self.extractor = None
        self.reference: torch.Tensor | None = None
        self._done_at = -1  # global step of the last evaluation

    def setup(self, trainer: Trainer, module: LightningModule, stage: str) -> None:
        if self.every_n_steps <= 0 or stage != "fit":
            return
        from hydra.utils import instantiate
        from lightning.pytorch.utilities import rank_zero_warn

        from diffusion.errors import UserError

        if self.sampler is not None:  # fail now, not at the first evaluation hours in
            module.validate_sampler(self.sampler)

        try:
            self.extractor = instantiate(self.extractor_cfg)
        except Exception as err:
            cause = err.__cause__ or err
            if isinstance(cause, UserError) and self.skip_without_weights:
                rank_zero_warn(f"FID callback off: {cause}")
                self.every_n_steps = 0
                return
            raise
        if isinstance(self.extractor, torch.nn.Module):
            self.extractor = self.extractor.to(module.device)

    def _reference(self, trainer: Trainer, module: LightningModule) -> torch.Tensor:
        import json

        from diffusion.evaluation import metrics

        if self.reference is None:
            dm = trainer.datamodule
            key = json.dumps(
                {
                    "data": module.hparams.get("data"),
                    "n": self.reference_n,
                    "features": self.extractor_cfg,
                },
                sort_keys=True,
                default=str,
            )

            def compute() -> torch.Tensor:
                train_set = dm.train_set
                if hasattr(train_set, "__len__"):
                    count = min(self.reference_n, len(train_set))
                    items = [train_set[i] for i in range(count)]  # (image, label) if conditional
                else:  # a stream (data=webdataset): its first reference_n samples
                    items = list(itertools.islice(iter(train_set), self.reference_n))
                images = torch.stack([x[0] if isinstance(x, tuple) else x for x in items])
                return metrics.extract(self.extractor, images, device=module.device)["pool"]

            self.reference = metrics.cached_reference_features(key, compute, self.cache_dir)
        return self.reference

    def on_train_batch_end(self, trainer: Trainer, module: LightningModule, *args) -> None:
        step = trainer.global_step
        due = self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0
        if not due or step == self._done_at:
            return
        self._done_at = step
        from diffusion.evaluation import metrics
        from diffusion.evaluation.draw import draw, to_uint8

        real = self._reference(trainer, module)
        world, rank = trainer.world_size, trainer.global_rank
        local_n = -(-self.n // world)
        labels = balanced_labels(self.n, module.num_classes)  # class-balanced, conditional only
        mine = None if labels is None else labels[rank * local_n : (rank + 1) * local_n]
        if mine is not None and len(mine) < local_n:
            mine = torch.cat([mine, labels[: local_n - len(mine)]])
        images, _ = draw(module, local_n, self.batch_size, self.seed + 1000 * rank, self.sampler,
                         progress=False, labels=mine)  # fmt: skip
        fake = metrics.extract(self.extractor, to_uint8(images), device=module.device)["pool"]
        gathered = module.all_gather(fake.to(module.device))
        fake = gathered.reshape(-1, gathered.shape[-1])[: self.n].double().cpu()
        module.log("val/fid", metrics.frechet_distance(fake, real), rank_zero_only=False)
        if self.kid:
            kid, _ = metrics.kernel_inception_distance(
                fake, real, subsets=50, subset_size=min(1000, len(fake))
            )
            module.log("val/kid", kid)


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar, counting optimizer steps when the run is bounded by
    ``max_steps`` (``Epoch 3 · step 760/2800``) instead of ``Epoch 76/-2``."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_steps is None or trainer.max_steps < 0:
            return super()._get_train_description(current_epoch)
        return f"Epoch {current_epoch} · step {trainer.global_step}/{trainer.max_steps}"

    def on_train_batch_end(self, trainer: Trainer, module: LightningModule, *args) -> None:
        super().on_train_batch_end(trainer, module, *args)
        if self.progress is not None and self.train_progress_bar_id is not None:
            description = self._get_train_description(trainer.current_epoch)
            self.progress.update(self.train_progress_bar_id, description=description)


class PreemptionCheckpoint(Callback):
    """On SIGTERM (and SIGUSR1, the usual SLURM pre-emption warning), finish the current batch,
    save ``{dirpath}/last.ckpt`` and stop; ``ckpt_path=last`` in the same run directory resumes.
    ``last.ckpt`` is also written when training ends, so the final steps are never lost when
    ``max_steps`` is not a multiple of the validation interval.

    Lightning turns SIGTERM into a ``SIGTERMException`` at the next batch boundary (on every
    rank); this callback saves the checkpoint then. SIGUSR1 is forwarded as SIGTERM, except
    under SLURM, where Lightning's own auto-requeue handler owns it.
    """

    def __init__(self, dirpath: str) -> None:
        super().__init__()
        self.dirpath = Path(dirpath)
        self.saved: Path | None = None
        self._previous_usr1 = None

    def on_fit_start(self, trainer: Trainer, module: LightningModule) -> None:
        import signal
        import threading

        from lightning.fabric.plugins.environments import SLURMEnvironment

        main_thread = threading.current_thread() is threading.main_thread()
        if hasattr(signal, "SIGUSR1") and main_thread and not SLURMEnvironment.detect():
            self._previous_usr1 = signal.signal(signal.SIGUSR1, self._forward_as_sigterm)

    @staticmethod
    def _forward_as_sigterm(signum, frame) -> None:
        import os
        import signal

        os.kill(os.getpid(), signal.SIGTERM)

    def on_exception(
        self, trainer: Trainer, module: LightningModule, exception: BaseException
    ) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exception, SIGTERMException):
            self.saved = self.dirpath / "last.ckpt"
            trainer.save_checkpoint(self.saved, weights_only=False)
        self._restore()

    def on_train_end(self, trainer: Trainer, module: LightningModule) -> None:
        trainer.save_checkpoint(self.dirpath / "last.ckpt", weights_only=False)

    def on_fit_end(self, trainer: Trainer, module: LightningModule) -> None:
        self._restore()

    def _restore(self) -> None:
        import signal

        if self._previous_usr1 is not None:
            signal.signal(signal.SIGUSR1, self._previous_usr1)
            self._previous_usr1 = None
