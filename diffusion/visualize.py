"""See the process: ``python -m diffusion.visualize mode=forward|schedules|denoise``.

- ``forward``: dataset images noised to x_T at chosen steps, one-shot q(x_t | x_0) above the
  iterated chain q(x_t | x_{t-1}), from the same seed (``forward.png``).
- ``schedules``: β_t, ᾱ_t, √ᾱ_t and log-SNR(t) of several schedules on shared axes
  (``schedules.png``) and one image's forward strip under each schedule (``schedules_forward.png``).
- ``denoise``: from a checkpoint (``ckpt=``), the reverse trajectory x_T → x_0 of a few samples
  with the predicted x̂_0 under each step (``denoise.png``) and as an animation (``denoise.gif``).

Files go to the run directory (``outputs/visualize/<mode>_<time>/``, or ``out_dir=``).
"""

from __future__ import annotations

import time
from importlib.resources import files
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffusion.checkpoints import CHECKPOINT_FIELDS, load_checkpoint
from diffusion.config import NODE, Field, build, check_fields
from diffusion.errors import ConfigError, exit_on_user_error
from diffusion.evaluation import plots
from diffusion.processes.ddpm import GaussianDiffusion
from diffusion.training.data import to_model_range

MODES = ("forward", "schedules", "denoise")


def available_schedules() -> list[str]:
    return sorted(
        p.name[:-5]
        for p in (files("diffusion.conf") / "schedule").iterdir()
        if p.name.endswith(".yaml")
    )


def load_schedule(name: str, T: int) -> torch.Tensor:
    """β of the shipped schedule config ``conf/schedule/<name>.yaml`` at ``T`` steps."""
    if name not in available_schedules():
        raise ConfigError(f"unknown schedule {name!r}; available: {available_schedules()}")
    node = OmegaConf.create((files("diffusion.conf") / "schedule" / f"{name}.yaml").read_text())
    return instantiate(node)(T)


def dataset_images(cfg: DictConfig, n: int) -> torch.Tensor:
    """The first ``n`` validation images of ``cfg.data``, in [-1, 1], (n, C, H, W)."""
    datamodule = build(cfg.data, "data")
    datamodule.prepare_data()
    datamodule.setup("validate")
    val = datamodule.val_set
    images = torch.stack([val[i] for i in range(min(n, len(val)))])
    return to_model_range(images)


def save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=plots.DPI)
    return path


def run_forward(cfg: DictConfig, out: Path) -> list[Path]:
    process = GaussianDiffusion(build(cfg.schedule, "schedule")(cfg.T))
    steps = list(cfg.steps) if cfg.steps else plots.paper_steps(cfg.T, cfg.num_steps)
    x0 = dataset_images(cfg, cfg.n)
    one_shot, chain = plots.forward_strips(process, x0, steps, seed=cfg.seed)
    rows = []
    for i in range(x0.shape[0]):
        rows += [(f"#{i} q(x_t|x_0)", one_shot[:, i]), (f"#{i} chain", chain[:, i])]
    name = cfg.schedule._target_.rsplit(".", 1)[-1]
    fig = plots.plot_strips(
        rows, [f"t={s}" for s in steps], f"Forward process, {name} schedule, T={cfg.T}"
    )
    return [save(fig, out / "forward.png")]


def run_schedules(cfg: DictConfig, out: Path) -> list[Path]:
    names = list(cfg.schedules) or available_schedules()
    betas = {name: load_schedule(name, cfg.T) for name in names}
    fig = plots.plot_schedules({n: plots.schedule_curves(b) for n, b in betas.items()}, cfg.T)
    paths = [save(fig, out / "schedules.png")]
    steps = list(cfg.steps) if cfg.steps else plots.paper_steps(cfg.T, cfg.num_steps)
    x0 = dataset_images(cfg, 1)
    rows = [
        (name, plots.forward_strips(GaussianDiffusion(beta), x0, steps, seed=cfg.seed)[0][:, 0])
        for name, beta in betas.items()
    ]
    fig = plots.plot_strips(
        rows, [f"t={s}" for s in steps], f"q(x_t | x_0) under each schedule, T={cfg.T}"
    )
    paths.append(save(fig, out / "schedules_forward.png"))
    return paths


def run_denoise(cfg: DictConfig, out: Path) -> list[Path]:
    if not cfg.ckpt:
        raise ConfigError("mode=denoise needs a checkpoint: ckpt=path/to/last.ckpt")
    ckpt = Path(cfg.ckpt).expanduser()
    module = load_checkpoint(cfg, torch.device("cpu"))
    recorder = plots.TrajectoryRecorder(k=cfg.n)
    generator = torch.Generator().manual_seed(cfg.seed)
    module.sample(cfg.n, generator=generator, callback=recorder, sampler=cfg.get("sampler"))
    sampler = (cfg.get("sampler") or module.hparams.sampler)["_target_"].rsplit(".", 1)[-1]
    title = f"Reverse process x_T → x_0 ({ckpt.name}, EMA, {sampler}, NFE {len(recorder.frames)})"
    fig = plots.denoising_strip(recorder, cfg.num_steps, title, module.process.time_text)
    paths = [save(fig, out / "denoise.png")]
    plots.save_gif(plots.denoising_frames(recorder, cfg.gif_frames), out / "denoise.gif")
    return paths + [out / "denoise.gif"]


FIELDS = {
    **CHECKPOINT_FIELDS, "ckpt": Field("checkpoint", nullable=True),
    "mode": Field("choice", choices=MODES), "T": Field("int", 1), "n": Field("int", 1),
    "steps": Field("list", 0, nullable=True), "num_steps": Field("int", 2),
    "schedules": Field("list"), "gif_frames": Field("int", 1), "data": NODE, "schedule": NODE,
}  # fmt: skip
"""The top-level keys of ``python -m diffusion.visualize``."""


def visualize(cfg: DictConfig) -> list[Path]:
    """Run one mode; returns the files written."""
    check_fields(cfg, FIELDS, "visualize")
    if cfg.steps and max(cfg.steps) > cfg.T:
        raise ConfigError(
            f"steps={list(cfg.steps)} is invalid: the paper's steps run from 0 (the data) to "
            f"T={cfg.T}"
        )
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = {"forward": run_forward, "schedules": run_schedules, "denoise": run_denoise}[cfg.mode]
    return run(cfg, out)


@hydra.main(config_path="conf", config_name="visualize", version_base="1.3")
def main(cfg: DictConfig) -> None:
    start = time.perf_counter()
    with exit_on_user_error():
        paths = visualize(cfg)
    for path in paths:
        print(f"wrote {path}")
    print(f"mode={cfg.mode} took {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
