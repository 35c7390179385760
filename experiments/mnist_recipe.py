"""The training recipe the MNIST experiments share (experiments/fid_vs_nfe/train.sh): unet_small
on the 10k real MNIST test images (../shared/data/mnist-t10k), 2,800 steps of batch 64, lr 1e-3
with 200 warm-up steps, EMA 0.999, T = 1000, linear β, seed 0. Experiments add their own
overrides (an objective, classes) and run it with :func:`train_run`."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import torch

EXPERIMENTS = Path(__file__).resolve().parent
ROOT = EXPERIMENTS.parent
FID_VS_NFE = EXPERIMENTS / "fid_vs_nfe"
SHARED = ROOT.parent / "shared" / "data"
STEPS = 2800
RECIPE = [
    "data=mnist", f"data.root={(FID_VS_NFE / 'data').relative_to(ROOT)}", "data.num_workers=0",
    "data.pin_memory=false", "data.val_fraction=0.02", "data.batch_size=64", "model=unet_small",
    "T=1000", "schedule=linear", "optimizer.lr=1e-3", "module.warmup_steps=200",
    "module.ema_decay=0.999", f"trainer.max_steps={STEPS}", "trainer.val_check_interval=700",
    "trainer.log_every_n_steps=50", "callbacks.sample_grid.every_n_steps=0",
    "callbacks.sample_grid.strip_n=0", "seed=0",
]  # fmt: skip


def trained_steps(run_dir: Path) -> int:
    """The global step of ``run_dir``'s last.ckpt (0 if there is none)."""
    path = run_dir / "checkpoints" / "last.ckpt"
    return int(torch.load(path, weights_only=True)["global_step"]) if path.exists() else 0


def train_run(
    run_dir: Path, overrides: list[str], extra: list[str] = (), recipe: list[str] = RECIPE
) -> float:
    """Train the recipe with ``overrides`` into ``run_dir`` (diffusion.train, a process of its
    own), resuming its last.ckpt if a run was stopped (SIGTERM saves one; the resume is exact);
    returns the minutes it took. ``extra``: further overrides that are not part of the row;
    ``recipe``: the recipe's overrides (another dataset replaces its data= and data.root=)."""
    subprocess.run(
        [sys.executable, str(FID_VS_NFE / "prepare_data.py"), str(SHARED / "mnist-t10k"),
         str(FID_VS_NFE / "data")], check=True,
    )  # fmt: skip
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "diffusion.train", *recipe, *overrides, *extra,
         f"hydra.run.dir={run_dir}", "ckpt_path=last"], check=True, cwd=ROOT,
    )  # fmt: skip
    return (time.perf_counter() - start) / 60


def train_to_budget(run_dir: Path, overrides: list[str], recipe: list[str] = RECIPE) -> bool:
    """Train (or resume) ``run_dir`` to the recipe's STEPS; True when it has them, else it says
    that the training stopped early (a SIGTERM) and how to go on."""
    if trained_steps(run_dir) < STEPS:
        train_run(run_dir, overrides, recipe=recipe)
    if trained_steps(run_dir) < STEPS:
        print(f"training stopped before step {STEPS}; run again to resume", flush=True)
        return False
    return True
