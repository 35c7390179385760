"""Crash-safe checkpoints, clear errors for unreadable checkpoints, NaN guards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from diffusion.checkpoints import AtomicCheckpointIO, check_readable
from diffusion.errors import NonFiniteLossError, UserError
from diffusion.train import train
from diffusion.training.objective import Objective

from conftest import TINY, compose_train


def test_atomic_save_keeps_the_previous_checkpoint_when_a_write_dies(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)

    def dies_half_way(obj, f):
        f.write(b"PK\x03\x04 half a zip")  # what a crash mid-write would leave
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left


def test_kill_9_during_training_never_leaves_an_unreadable_checkpoint_and_resume_works(tmp_path):
    """Checkpoints every step; SIGKILL at several moments; every *.ckpt stays loadable."""
    args = [
        *TINY, "trainer.max_steps=100000", "trainer.val_check_interval=1000000",
        "callbacks.checkpoint.every_n_train_steps=1", "callbacks.checkpoint.monitor=null",
        "callbacks.checkpoint.save_top_k=1", "callbacks.sample_grid.every_n_steps=0",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "disabled"}
    ckpt_dir = tmp_path / "run" / "checkpoints"
    for kill_after in (0.2, 0.55, 0.9):  # a step (and its checkpoint) takes ~0.1-0.3 s here
        proc = subprocess.Popen(
            [sys.executable, "-m", "diffusion.train", *args],
            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        deadline = time.time() + 120
        while not (ckpt_dir / "last.ckpt").exists() and time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.05)
        time.sleep(kill_after)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpts = list(ckpt_dir.glob("*.ckpt"))
        assert ckpts
        for ckpt in ckpts:
            check_readable(ckpt)  # raises if truncated
    step = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]
    assert step > 0
    resume = [*args[:-1], f"trainer.max_steps={step + 2}", f"ckpt_path={ckpt_dir / 'last.ckpt'}"]
    train(compose_train(resume, tmp_path / "resumed"))  # in-process: no signal needed here
    after = torch.load(
        tmp_path / "resumed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    assert after["global_step"] == step + 2


def test_resuming_from_a_corrupt_checkpoint_names_the_file(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x80\x04 not a checkpoint")
    message = r"cannot read checkpoint .*bad.ckpt.*truncated, corrupt or not a checkpoint"
    with pytest.raises(UserError, match=message):
        train(compose_train([*TINY, f"ckpt_path={bad}"], tmp_path / "run"))
    with pytest.raises(UserError, match="does not exist"):
        train(compose_train([*TINY, f"ckpt_path={tmp_path / 'missing.ckpt'}"], tmp_path / "run"))


def nan_on_calls(monkeypatch, calls: set[int]) -> None:
    """Make the training objective return NaN on the given (1-based) calls."""
    original = Objective.__call__
    count = {"n": 0}

    def patched(self, *args, **kwargs):
        count["n"] += 1
        loss = original(self, *args, **kwargs)
        return loss * float("nan") if count["n"] in calls else loss

    monkeypatch.setattr(Objective, "__call__", patched)


def test_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_checkpoint(
    tmp_path, monkeypatch
):
    nan_on_calls(monkeypatch, {4})  # one call per training step (no validation before step 1000)
    cfg = compose_train(
        [*TINY, "trainer.val_check_interval=1000", "callbacks.checkpoint.every_n_train_steps=1",
         "callbacks.checkpoint.monitor=null"],
        tmp_path,
    )  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 3"):
        train(cfg)
    last = torch.load(
        tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    assert last["global_step"] == 3  # written after step 3, before the bad batch
    assert all(
        torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point()
    )


def test_nan_loss_can_skip_the_batch(tmp_path, monkeypatch):
    nan_on_calls(monkeypatch, {2})
    cfg = compose_train(
        [*TINY, "module.nonfinite_loss=skip", "trainer.val_check_interval=1000"], tmp_path
    )
    train(cfg)
    last = torch.load(
        tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    assert last["global_step"] == 4  # the skipped batch made no optimizer step, so 5 batches ran
    assert "train/skipped_steps" in (tmp_path / "csv" / "metrics.csv").read_text()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_saves_a_checkpoint_exits_cleanly_and_resumes_in_place(tmp_path, signum):
    run_dir = tmp_path / "run"
    args = [*TINY, "trainer.max_steps=100000", "trainer.val_check_interval=1000000",
            "callbacks.sample_grid.every_n_steps=0", f"hydra.run.dir={run_dir}"]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "diffusion.train", *args],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 120
    # metrics.csv is written after the first step, so the signal handlers are in place by then
    while not list((run_dir / "csv").glob("metrics.csv")) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert (
        "stopped by SIGTERM/SIGUSR1" in out + err and "Traceback" not in err
    )  # Hydra logs to stdout
    step = torch.load(
        run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )["global_step"]
    assert step > 0
    # resumed in place (in-process: the signal needed a real process, the resume does not)
    train(compose_train([*args[:-1], f"trainer.max_steps={step + 2}", "ckpt_path=last"], run_dir))
    after = torch.load(
        run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    assert after["global_step"] == step + 2
    # the first part's metrics are kept; the resumed part logs beside them
    assert (run_dir / "csv" / "metrics.csv").is_file()
    assert (run_dir / "csv" / "resumed_1" / "metrics.csv").is_file()
