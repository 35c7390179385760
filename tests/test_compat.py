"""Checkpoints and configs of earlier versions load: their ``_target_`` paths and renamed keys
are made current (diffusion.compat), and they sample exactly as the current form does."""

from __future__ import annotations

import copy

import pytest
import torch
from hydra.utils import get_object
from omegaconf import OmegaConf

from diffusion.checkpoints import check_resumable, load_module
from diffusion.compat import current_target, upgrade
from diffusion.errors import UserError
from diffusion.processes.sde import VPSDE
from diffusion.training.module import DiffusionModule
from diffusion.training.weighting import Likelihood

from conftest import TINY, compose_train

# Every _target_ the shipped configs named before the package was laid out by layer.
OLD_TARGETS = [
    "diffusion.process.ddpm", "diffusion.sde.VPSDE", "diffusion.sde.SubVPSDE",
    "diffusion.sde.VESDE", "diffusion.sde.NCSN", "diffusion.schedules.linear",
    "diffusion.schedules.cosine", "diffusion.schedules.sigmoid", "diffusion.schedules.quadratic",
    "diffusion.samplers.ddpm_ancestral", "diffusion.samplers.ddim", "diffusion.samplers.dpm_solver",
    "diffusion.score_samplers.euler_maruyama", "diffusion.score_samplers.predictor_corrector",
    "diffusion.score_samplers.probability_flow", "diffusion.score_samplers.annealed_langevin",
    "diffusion.module.DiffusionModule", "diffusion.data.DigitsDataModule",
    "diffusion.data.TorchvisionDataModule", "diffusion.data.ImageFolderDataModule",
    "diffusion.callbacks.SampleGrid", "diffusion.callbacks.FIDCallback",
    "diffusion.metrics.InceptionFeatures", "diffusion.nn.UNet",
]  # fmt: skip


@pytest.mark.parametrize("old", OLD_TARGETS)
def test_every_old_target_resolves_to_todays_object(old):
    new = current_target(old)
    obj = get_object(new)
    assert obj.__name__ == old.rsplit(".", 1)[-1]  # the same object, moved
    assert current_target(new) == new  # today's paths are left alone


def as_old(hparams: dict) -> dict:
    """A checkpoint's hyperparameters as the previous version wrote them."""
    old = copy.deepcopy(hparams)
    for key in ("prediction", "loss_weight", "learn_sigma", "vlb_weight"):
        old.pop(key, None)
    old["schedule"]["_target_"] = "diffusion.schedules.linear"
    old["process"] = {"_target_": "diffusion.process.ddpm", "schedule": old["schedule"], "T": 20}
    old["sampler"]["_target_"] = "diffusion.samplers.ddpm_ancestral"
    return old


def test_an_old_checkpoint_loads_samples_alike_and_resumes(tiny_ckpt, tmp_path):
    ckpt = torch.load(tiny_ckpt, weights_only=False)
    ckpt["hyper_parameters"] = as_old(ckpt["hyper_parameters"])
    old_path = tmp_path / "old.ckpt"
    torch.save(ckpt, old_path)
    old, new = load_module(old_path), load_module(tiny_ckpt)
    assert old.hparams.process["_target_"] == "diffusion.processes.ddpm.ddpm"
    assert old.hparams.prediction == "eps" and not old.hparams.learn_sigma
    a = old.sample(3, generator=torch.Generator().manual_seed(0))
    b = new.sample(3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    cfg = compose_train(TINY)
    current = OmegaConf.to_container(cfg.module, resolve=True)
    check_resumable(old_path, current)  # the same run, in the old words and the new
    current["prediction"] = "v"  # the control: another target is named, with both values
    with pytest.raises(UserError, match="module.prediction: checkpoint 'eps', config 'v'"):
        check_resumable(old_path, current)


def test_an_old_sde_config_keeps_its_meaning():
    """``eps`` (the smallest time) is now ``t_min``; ``weighting=likelihood`` is the likelihood
    loss weight."""
    cfg = OmegaConf.to_container(compose_train([*TINY, "process=vp_sde"]).module, resolve=True)
    cfg["process"] = {"_target_": "diffusion.sde.VPSDE", "beta_min": 0.1, "beta_max": 20.0,
                      "eps": 0.002, "weighting": "likelihood"}  # fmt: skip
    cfg.pop("loss_weight")
    assert upgrade(cfg["process"])["t_min"] == 0.002
    module = DiffusionModule(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    assert isinstance(module.process, VPSDE) and module.process.t_min == 0.002
    assert isinstance(module.objective.weight, Likelihood)
