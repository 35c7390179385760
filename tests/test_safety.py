"""Loading a checkpoint never runs code from it; a file that is not a checkpoint, and a device
the machine lacks, are named in one line."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

from diffusion.checkpoints import check_readable, load_module, pick_device
from diffusion.errors import UserError


class RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint does."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def crafted(tmp_path, tiny_ckpt):
    """A real checkpoint with a code-running object hidden in its hyperparameters."""
    marker = tmp_path / "pwned"
    ckpt = torch.load(tiny_ckpt, weights_only=True)
    ckpt["hyper_parameters"]["data"]["note"] = RunsCode(str(marker))
    path = tmp_path / "crafted.ckpt"
    torch.save(ckpt, path)
    return path, marker


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, tiny_ckpt):
    path, marker = crafted(tmp_path, tiny_ckpt)
    for load in (load_module, check_readable):
        with pytest.raises(UserError, match="could run code, so it is refused; if you trust its "
                                            "author, add trust_checkpoint=true"):  # fmt: skip
            load(path)
    assert not marker.exists()
    # the control: the same file, trusted, runs the code (which is why it is refused by default)
    check_readable(path, trust=True)
    assert marker.exists()


def test_resuming_from_a_crafted_checkpoint_is_refused_before_training(tmp_path, tiny_ckpt):
    from diffusion.train import train

    from conftest import TINY, compose_train

    path, marker = crafted(tmp_path, tiny_ckpt)
    with pytest.raises(UserError, match="could run code"):
        train(compose_train([*TINY, f"ckpt_path={path}"], tmp_path / "run"))
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_the_checkpoints_we_write_load_as_weights_only(tiny_ckpt):
    ckpt = torch.load(tiny_ckpt, weights_only=True)
    assert isinstance(ckpt["hyper_parameters"]["net"], dict) and "state_dict" in ckpt


def test_a_png_given_as_a_checkpoint_is_named(tmp_path):
    png = tmp_path / "grid.png"
    Image.new("L", (8, 8)).save(png)
    with pytest.raises(UserError, match=r"cannot read checkpoint .*grid.png.*not a checkpoint"):
        load_module(png)


def test_a_device_the_machine_lacks_is_named_not_blamed_on_the_checkpoint():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError, match="device='cuda' is invalid: this machine has 0 CUDA GPU"):
        pick_device("cuda")
    with pytest.raises(UserError, match="device='gpu0' is invalid"):
        pick_device("gpu0")
    assert pick_device("cpu") == torch.device("cpu")
