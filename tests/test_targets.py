"""Prediction targets, loss weightings and the learned variance through the real entry points,
and their bad input: one clear line each, before anything is written."""

from __future__ import annotations

import logging

import pytest
import torch
from hydra import compose, initialize_config_module

from diffusion.checkpoints import load_module
from diffusion.errors import ConfigError, UserError
from diffusion.evaluation.likelihood import bits_per_dim
from diffusion.sample import run as sample_run
from diffusion.train import train
from diffusion.training.weighting import P2

from conftest import TINY, compose_train


@pytest.mark.parametrize(
    "overrides,check",
    [
        (["module.prediction=v", "loss_weight=min_snr", "loss_weight.gamma=3"],
         lambda m: m.hparams.prediction == "v" and m.objective.weight.gamma == 3),
        (["module.prediction=x0", "module.loss_weight=p2"],
         lambda m: m.hparams.prediction == "x0" and isinstance(m.objective.weight, P2)),
        (["process=vp_sde", "module.prediction=v", "loss_weight=likelihood", "sampler=ddim",
          "sampler.steps=4"], lambda m: m.process.family == "vp_sde"),
    ],
)  # fmt: skip
def test_targets_and_weightings_train_and_sample(overrides, check, tmp_path):
    train(compose_train([*TINY, *overrides], tmp_path))
    module = load_module(tmp_path / "checkpoints" / "last.ckpt")
    assert check(module)
    x = module.sample(2, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 1, 16, 16) and torch.isfinite(x).all()


def test_a_learned_variance_trains_samples_and_enters_the_bound(tmp_path, caplog):
    train(compose_train([*TINY, "module.learn_sigma=true"], tmp_path))
    module = load_module(tmp_path / "checkpoints" / "last.ckpt")
    assert module.net.out[-1].out_channels == 2  # ε and v for one image channel
    pred = module.predictor()(torch.zeros(2, 1, 16, 16), torch.tensor([0, 19]))
    assert pred.var_frac is not None and pred.eps_hat.shape == (2, 1, 16, 16)
    x0 = torch.rand(2, 1, 16, 16) * 2 - 1
    learned = bits_per_dim(module.predictor(), x0, "beta", torch.Generator().manual_seed(0))
    fixed = module.predictor()
    fixed.learn_sigma = False  # the control: the mean alone, with σ² = β
    fixed.net = lambda x, t: module.ema(x, t)[:, :1]
    other = bits_per_dim(fixed, x0, "beta", torch.Generator().manual_seed(0))
    assert not torch.allclose(learned["total"], other["total"])
    with caplog.at_level(logging.INFO):
        module.sample(1, sampler={"_target_": "diffusion.samplers.ddim", "_partial_": True,
                                  "steps": 2})  # fmt: skip
    assert "uses the model's mean only: the learned variance is not used" in caplog.text


def test_a_checkpoint_cannot_be_sampled_as_another_target(tiny_ckpt, tmp_path):
    with initialize_config_module("diffusion.conf", version_base="1.3"):
        cfg = compose("sample", overrides=[f"ckpt={tiny_ckpt}", "prediction=v", "n=1",
                                           f"out_dir={tmp_path / 'out'}"])  # fmt: skip
    with pytest.raises(UserError, match="prediction='v', but checkpoint .* was trained with "
                                        "module.prediction='eps'"):  # fmt: skip
        sample_run(cfg)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["module.prediction=score"], r"module.prediction='score' is invalid: choose one of "
                                      r"\['eps', 'x0', 'v', 'edm'\]"),
        (["module.loss_weight=minsnr"], r"module.loss_weight='minsnr' is invalid: choose one of "
                                        r"\['likelihood', 'min_snr'"),
        (["process=ncsn", "loss_weight=likelihood"],
         r"loss_weight=likelihood needs the process's sde view; process=ncsn offers \['levels'\]"),
        (["process=vp_sde", "module.learn_sigma=true"],
         "module.learn_sigma=true needs a process with a discrete variational bound"),
        (["process=ve_sde", "loss_weight=vlb"], "loss_weight=vlb needs the process's vlb view"),
        (["module.learn_sigma=maybe"], "module.learn_sigma='maybe' is invalid"),
        (["loss_weight=min_snr", "loss_weight.gamma=-1"], "loss_weight: gamma must be > 0"),
    ],
)  # fmt: skip
def test_bad_objectives_fail_at_start_up_naming_the_key(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        train(compose_train([*TINY, *overrides], tmp_path))
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # nothing written
