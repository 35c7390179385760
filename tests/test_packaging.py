"""The configs ship inside the wheel: the entry point runs from an installed wheel, far from the
source checkout."""

import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import TINY

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_the_configs_and_trains_outside_the_checkout(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(ROOT)],
        check=True, capture_output=True,
    )  # fmt: skip
    wheel = next((tmp_path / "dist").glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "diffusion/conf/train.yaml" in names
    assert "diffusion/conf/schedule/cosine.yaml" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "work"
    work.mkdir()
    env = {"PYTHONPATH": str(site), "WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin"}
    where = subprocess.run(
        [sys.executable, "-c", "import diffusion; print(diffusion.__file__)"],
        cwd=work, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert where.stdout.strip().startswith(str(site))
    proc = subprocess.run(
        [sys.executable, "-m", "diffusion.train", *TINY, "trainer.max_steps=1"],
        cwd=work, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((work / "outputs" / "runs").glob("*/checkpoints/last.ckpt"))
