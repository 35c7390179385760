"""Shared test helpers: composing the real configs with tiny, fast overrides.

Under pytest-xdist (``make test`` runs ``-n 2``) each worker, and every process a test starts,
uses one torch thread: two workers with two threads each on two cores spend their time spinning
in OpenMP barriers (the suite took longer in parallel than serially)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

IN_WORKER = "PYTEST_XDIST_WORKER" in os.environ
if IN_WORKER:
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # for the processes the tests start

# A model and run small enough for a few CPU seconds per test.
TINY = [
    "model.width=8",
    "model.channel_mult=[1,2]",
    "model.norm_groups=4",
    "T=20",
    "trainer.accelerator=cpu",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "~callbacks.progress_bar",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.pin_memory=false",
    "callbacks.sample_grid.n=4",
    "callbacks.sample_grid.every_n_steps=2",
    "module.warmup_steps=2",
]


def compose_train(overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """The composed primary config, as ``python -m diffusion.train`` would see it."""
    extra = [f"paths.output_dir={output_dir}"] if output_dir is not None else []
    with initialize_config_module("diffusion.conf", version_base="1.3"):
        return compose("train", overrides=[*overrides, *extra])


def run_cli(
    args: list[str],
    cwd: Path,
    env: dict | None = None,
    timeout: float = 300,
    entry: str = "diffusion.train",
) -> subprocess.CompletedProcess:
    """Run ``python -m ENTRY ARGS`` in ``cwd``; returns the finished process."""
    full_env = {**os.environ, "WANDB_MODE": "disabled", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", entry, *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def tiny() -> list[str]:
    return list(TINY)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """One tiny DDPM checkpoint, trained for two steps, shared by the tests that only read it."""
    from diffusion.train import train

    out = tmp_path_factory.mktemp("tiny_run")
    train(compose_train([*TINY, "trainer.max_steps=2"], out))
    return out / "checkpoints" / "last.ckpt"
