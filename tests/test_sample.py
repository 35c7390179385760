"""``python -m diffusion.sample`` end to end on a checkpoint trained for a few steps."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from PIL import Image

from diffusion.errors import UserError
from diffusion.sample import run

from conftest import run_cli


@pytest.fixture
def ckpt(tiny_ckpt):
    return tiny_ckpt  # the session's shared tiny checkpoint (conftest)


def sample(overrides: list[str], out) -> dict:
    with initialize_config_module("diffusion.conf", version_base="1.3"):
        cfg = compose("sample", overrides=[*overrides, f"out_dir={out}"])
    return run(cfg)


def test_writes_grid_npz_strip_info_and_images(ckpt, tmp_path):
    info = sample(
        [f"ckpt={ckpt}", "n=5", "batch_size=2", "save_images=true", "strip_n=2"], tmp_path
    )
    images = np.load(tmp_path / "samples.npz")["images"]
    assert images.shape == (5, 16, 16, 1) and images.dtype == np.uint8
    assert sorted(p.name for p in (tmp_path / "images").iterdir())[-1] == "000004.png"
    with Image.open(tmp_path / "grid.png") as grid:
        # 5 images, 2 per row, 1-pixel padding; upscaled (nearest) to at least 512 pixels across
        factor = -(-512 // (2 * 17 + 1))
        assert grid.size == (factor * (2 * 17 + 1), factor * (3 * 17 + 1))
    assert (tmp_path / "denoise.png").is_file()
    saved = json.loads((tmp_path / "info.json").read_text())
    assert saved == info and info["nfe"] == 20 and info["seed"] == 0 and info["use_ema"]


@pytest.mark.parametrize(
    "sampler,nfe",
    [
        (["sampler=ddim", "sampler.steps=5"], 5),
        (["sampler=dpm_solver", "sampler.steps=4"], 4),
        (["sampler=ddpm", "sampler.steps=7"], 7),
        (["sampler=ddim", "sampler.steps=3", "sampler.eta=1.0", "sampler.spacing=trailing"], 3),
        (["sampler=ddim", "sampler.steps=4", "sampler.spacing=karras"], 4),
        (["sampler=heun", "sampler.steps=3"], 5),  # EDM's sampler on a DDPM checkpoint
        (["sampler=euler", "sampler.steps=3", "sampler.S_churn=1"], 3),
    ],
)
def test_every_sampler_from_the_command_line(ckpt, tmp_path, sampler, nfe):
    info = sample([f"ckpt={ckpt}", "n=3", *sampler], tmp_path)
    assert info["nfe"] == nfe
    assert sampler[0].split("=")[1] in info["sampler"]["_target_"]


def test_same_seed_same_samples(ckpt, tmp_path):
    def images(seed, name, *extra):
        sample(
            [f"ckpt={ckpt}", "n=4", "batch_size=2", f"seed={seed}", "strip_n=0", *extra],
            tmp_path / name,
        )
        return np.load(tmp_path / name / "samples.npz")["images"]

    a, b, c = images(0, "a"), images(0, "b"), images(1, "c")
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert not np.array_equal(a, images(0, "raw", "use_ema=false"))  # EMA weights by default


def test_missing_or_corrupt_checkpoint_is_a_clear_error(ckpt, tmp_path):
    with pytest.raises(UserError, match="which checkpoint. give ckpt="):
        sample([], tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        sample([f"ckpt={tmp_path / 'nope.ckpt'}"], tmp_path)
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(ckpt.read_bytes()[:5000])
    with pytest.raises(UserError, match="truncated, corrupt or not a checkpoint"):
        sample([f"ckpt={broken}"], tmp_path)


def test_cli(ckpt, tmp_path):
    args = [f"ckpt={ckpt}", "n=2", "sampler=ddim", "sampler.steps=2"]
    proc = run_cli(args, cwd=tmp_path, entry="diffusion.sample")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 samples, NFE 2" in proc.stdout
    assert list((tmp_path / "outputs" / "samples").glob("*/samples.npz"))
