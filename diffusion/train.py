"""Train a diffusion model: ``python -m diffusion.train [group=option ...] [key=value ...]``.

Composes ``diffusion/conf/train.yaml`` with Hydra, checks it (see diffusion.config), builds
every object from its ``_target_`` node and runs ``Trainer.fit``. Everything a run writes goes to
its own output directory: ``config.yaml`` (resolved), ``checkpoints/``, ``samples/``, logs.
Returns the final ``optimize_metric`` (``val/loss``, or ``val/fid`` where FID is on), for sweepers.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from diffusion.allocator import keep_freed_memory
from diffusion.checkpoints import check_resumable, init_source
from diffusion.config import build, build_loggers, check_config
from diffusion.errors import ConfigError, UserError, exit_on_user_error

log = logging.getLogger(__name__)


def use_labels(module, datamodule) -> None:
    """A class-conditional model (``model.num_classes`` = K > 0) trains on the data's labels:
    the data must have K classes; their names go into the checkpoint. A text-conditional one
    (``text_encoder=``) trains on the data's captions."""
    if module.text:
        if not datamodule.has_captions():
            raise ConfigError(
                "text_encoder= asks for a text-conditional model, but this data has no captions "
                "(data=image_folder with a metadata.jsonl of file_name and text, or a .txt "
                "beside each image); or drop text_encoder"
            )
        datamodule.captions = True
        return
    k = getattr(module.net, "num_classes", 0)
    if not k:
        return
    names = datamodule.class_names()
    if names is None:
        raise ConfigError(
            f"model.num_classes={k} asks for a class-conditional model, but this data has no "
            "labels (data=image_folder needs one subfolder per class); use model.num_classes=0"
        )
    if len(names) != k:
        raise ConfigError(
            f"model.num_classes={k} does not match the data's {len(names)} classes "
            f"({', '.join(names[:10])}{', …' if len(names) > 10 else ''})"
        )
    datamodule.labels = True
    module.class_names = names


def start_from(cfg: DictConfig) -> tuple[str, dict] | None:
    """``module.init_from``: take the network, schedule, T, process and target of a diffusers
    model (``diffusers:<folder or hub id>``) or a checkpoint into ``cfg.module`` (in place);
    returns the spec and the weights to load into the built module, or None."""
    module = cfg.get("module")
    spec = module.get("init_from") if isinstance(module, DictConfig) else None  # else: checked
    if not spec:
        return None
    try:
        settings, state = init_source(str(spec), bool(cfg.get("trust_checkpoint")))
    except UserError as err:  # one line naming the key, whichever step refused
        raise ConfigError(f"module.init_from={spec!r}: {err}") from None
    shape = [int(v) for v in cfg.module.image_shape]
    trained = [int(v) for v in settings.pop("image_shape", shape)]
    if trained != shape:
        raise ConfigError(
            f"module.init_from={spec!r} was trained on images of shape (C, H, W) = "
            f"{tuple(trained)}, the data gives {tuple(shape)}: set data.image_size and "
            "data.channels to match"
        )
    with open_dict(cfg):
        for key, value in settings.items():
            cfg.module[key] = value
    log.info("module.init_from=%s: network, schedule, T and target taken from it", spec)
    return str(spec), state


def train(cfg: DictConfig) -> float | None:
    """Run one training described by a composed config; raises UserError on bad input."""
    initial = start_from(cfg)
    check_config(cfg)
    resume_from = _resume_file(cfg)
    if resume_from is not None:
        check_resumable(
            resume_from,
            OmegaConf.to_container(cfg.module, resolve=True),
            bool(cfg.get("trust_checkpoint")),
        )
        keep_earlier_logs(cfg)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build(cfg.data, "data")
    datamodule.check()
    module = build(cfg.module, "module")
    if initial is not None:
        try:
            module.load_network(initial[1])
        except UserError as err:
            raise ConfigError(f"module.init_from={initial[0]!r}: {err}") from None
    use_labels(module, datamodule)
    module.validate_sampler(module.hparams.sampler)  # now, not at the first grid hours later
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    name_sweep_runs(cfg)
    if rank_zero_only.rank == 0:  # DDP children (ranks > 0) rerun this function too
        (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    start = time.perf_counter()

    callbacks = [build(node, f"callbacks.{name}") for name, node in cfg.callbacks.items() if node]
    loggers = build_loggers(cfg.logger)
    trainer: L.Trainer = build(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False)
    if cfg.get("keep_freed_memory") and isinstance(trainer.accelerator, CPUAccelerator):
        keep_freed_memory()
    effective_batch = cfg.data.batch_size * trainer.world_size * trainer.accumulate_grad_batches
    scale = {"effective_batch_size": effective_batch, "world_size": trainer.world_size,
             "lr": cfg.optimizer.lr}  # fmt: skip
    log_summary(cfg, module, trainer, effective_batch, output_dir)
    for logger in loggers:
        logger.log_hyperparams({"config": OmegaConf.to_container(cfg, resolve=True), **scale})

    status = "failed"
    try:
        with ddp_inside_this_sweep_job(output_dir):
            trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    except SIGTERMException:
        saved = next((c.saved for c in callbacks if getattr(c, "saved", None)), None)
        log.warning(
            "stopped by SIGTERM/SIGUSR1 at step %d; checkpoint: %s. Resume in place with "
            "hydra.run.dir=%s ckpt_path=last",
            trainer.global_step, saved, output_dir,
        )  # fmt: skip
        status = "success"
        return None
    else:
        status = "success"
    finally:
        for logger in loggers:
            logger.finalize(status)
        if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
            import wandb

            wandb.finish()
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    result = {"global_step": trainer.global_step, "seconds": round(time.perf_counter() - start, 1),
              "metrics": metrics, **scale}  # fmt: skip
    if trainer.is_global_zero:
        (output_dir / "result.json").write_text(json.dumps(result, indent=2))
        grid = output_dir / "samples" / "final.png"
        shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())) or "no validation"
        log.info("done in %.0f s: %s | checkpoint %s | grid %s | %s", result["seconds"],
                 output_dir, output_dir / "checkpoints" / "last.ckpt",
                 grid if grid.is_file() else "none", shown)  # fmt: skip
    return metrics.get(cfg.get("optimize_metric") or "val/loss")


def log_summary(cfg: DictConfig, module, trainer: L.Trainer, batch: int, output_dir: Path) -> None:
    """What matters before a run starts: the network's size and memory, the data, the
    objective, the effective batch and where the outputs go (instead of Lightning's table)."""
    params = sum(p.numel() for p in module.net.parameters())
    # weights, their EMA and AdamW's two moments, float32
    state_mb = 4 * params * 4 / 2**20
    data = cfg.data
    name = data.get("dataset") or data._target_.rsplit(".", 1)[-1].removesuffix("DataModule")
    hp = module.hparams
    log.info("model: %s, %.2fM parameters, %.0f MB of weights + EMA + AdamW state",
             module.net.__class__.__name__, params / 1e6, state_mb)  # fmt: skip
    log.info("data: %s, %d×%d×%d; objective: process=%s, prediction=%s, loss_weight=%s%s",
             name, data.channels, data.image_size, data.image_size, module.process.family,
             hp.prediction, module.objective.weight.name,
             ", learned variance" if hp.learn_sigma else "")  # fmt: skip
    log.info("batch %d per device x %d device(s) x %d accumulated = %d per optimizer step; lr %g; "
             "%s steps", cfg.data.batch_size, trainer.world_size, trainer.accumulate_grad_batches,
             batch, cfg.optimizer.lr, trainer.max_steps)  # fmt: skip
    log.info("outputs: %s", output_dir)


class _DropLightningTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def quiet_library_noise() -> None:
    """Silence what a user cannot act on, each by its exact text (no blanket filter): Lightning's
    advertisement for its cloud logger, and a deprecation inside Lightning's pytree helper."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropLightningTip())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


@contextmanager
def ddp_inside_this_sweep_job(output_dir: Path) -> Iterator[None]:
    """Make DDP work inside a Hydra multirun, where Lightning alone gets it wrong.

    Lightning starts DDP ranks > 0 by rerunning the command with ``hydra.run.dir`` set to the
    parent's *run* directory: in a multirun that starts a whole new sweep elsewhere. So the
    children get this job's own overrides and directory. And Lightning leaves the process group
    and its environment variables (``LOCAL_RANK``, ``MASTER_PORT``, …) behind, so the next job
    of the sweep would think its ranks already exist: both are undone when the job ends.
    """
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        yield
        return
    hydra_cfg = HydraConfig.get()
    argv, environ = list(sys.argv), dict(os.environ)
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task]
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.run.dir = str(output_dir)
    try:
        yield
    finally:
        sys.argv = argv
        os.environ.clear()
        os.environ.update(environ)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def name_sweep_runs(cfg: DictConfig) -> None:
    """In a Hydra multirun, W&B runs without a group or name get the sweep's directory name as
    group and the job's overrides (``schedule=cosine,T=500``) as name, so one sweep is one group
    with the swept values visible; both also land in the run's config.yaml."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    hydra_cfg = HydraConfig.get()
    name = ",".join(hydra_cfg.overrides.task) or str(hydra_cfg.job.num)
    for node in (cfg.get("logger") or {}).values():
        if node and "WandbLogger" in node.get("_target_", ""):
            with open_dict(node):
                node.group = node.get("group") or f"sweep-{Path(hydra_cfg.sweep.dir).name}"
                node.name = node.get("name") or name


def keep_earlier_logs(cfg: DictConfig) -> None:
    """A run resumed in its own folder logs beside its earlier metrics, not over them: Lightning's
    CSV logger deletes the metrics.csv of the folder it writes to, so the resumed part goes to
    ``csv/resumed_<n>/``."""
    for node in (cfg.get("logger") or {}).values():
        if not node or not str(node.get("_target_", "")).endswith("CSVLogger"):
            continue
        folder = Path(node.save_dir) / node.name
        if node.get("version") == "" and (folder / "metrics.csv").exists():
            with open_dict(node):
                node.version = f"resumed_{len(list(folder.glob('resumed_*'))) + 1}"


def _resume_file(cfg: DictConfig) -> Path | None:
    """The file ``ckpt_path`` names: a path, or ``last``: the run's ``last.ckpt`` if it exists
    (Lightning then resumes from it; without one the run starts afresh)."""
    if cfg.ckpt_path in (None, "hpc", "registry"):
        return None
    if cfg.ckpt_path == "last":
        dirpath = (cfg.get("callbacks") or {}).get("checkpoint", {}).get("dirpath")
        last = Path(dirpath) / "last.ckpt" if dirpath else None
        return last if last is not None and last.is_file() else None
    return Path(cfg.ckpt_path)


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    quiet_library_noise()
    with exit_on_user_error():
        return train(cfg)


if __name__ == "__main__":
    main()
