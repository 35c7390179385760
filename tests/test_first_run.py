"""What a new user sees on a first run: steps in the progress bar, a summary that matters, one
closing line, one last.ckpt, checkpoints readable like any other output, no library noise."""

from __future__ import annotations

import logging
import os
import stat
import types

import torch

from diffusion.train import train
from diffusion.training.callbacks import StepProgressBar

from conftest import TINY, compose_train


def test_the_progress_bar_counts_steps_when_bounded_by_steps():
    bar = StepProgressBar()
    bar._trainer = types.SimpleNamespace(max_steps=2800, global_step=760, max_epochs=-1)
    assert bar._get_train_description(3) == "Epoch 3 · step 760/2800"
    bar._trainer = types.SimpleNamespace(max_steps=-1, global_step=760, max_epochs=10)
    assert bar._get_train_description(3).startswith("Epoch 3/9")  # Lightning's, by epochs


def test_a_short_run_leaves_one_last_ckpt_readable_as_the_umask_allows(tmp_path, caplog):
    """Shorter than one validation interval: one last.ckpt (no last-v1.ckpt), mode 0644 under
    umask 022 (not mkstemp's 0600); the summary and the closing line are logged."""
    old = os.umask(0o022)
    try:
        with caplog.at_level(logging.INFO, logger="diffusion.train"):
            train(compose_train([*TINY, "trainer.val_check_interval=1000"], tmp_path))
    finally:
        os.umask(old)
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert checkpoints == ["last.ckpt"]
    assert stat.S_IMODE((tmp_path / "checkpoints" / "last.ckpt").stat().st_mode) == 0o644
    text = caplog.text
    assert "parameters" in text and "per optimizer step" in text and f"outputs: {tmp_path}" in text
    assert f"checkpoint {tmp_path / 'checkpoints' / 'last.ckpt'}" in text


def test_the_same_seed_gives_the_same_bytes_of_weights(tmp_path):
    """What lets experiments rebuild their checkpoints instead of committing them."""
    states = []
    for run in ("a", "b"):
        train(compose_train(TINY, tmp_path / run))
        ckpt = torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=True)
        states.append(ckpt["state_dict"])
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
