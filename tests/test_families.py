"""Every family (DDPM, VP/sub-VP/VE SDE, NCSN) trains through the real entry point, leaves a
checkpoint that samples, and refuses samplers that do not suit it."""

from __future__ import annotations

import pytest
import torch
from test_sample import sample

from diffusion.analytic import GaussianEpsOracle
from diffusion.checkpoints import load_module
from diffusion.errors import ConfigError
from diffusion.families import as_ddpm, check_sampler
from diffusion.samplers import ddim
from diffusion.sde import NCSN, VESDE, VPSDE
from diffusion.train import train

from conftest import TINY, compose_train

# A few steps of each family with its default sampler, made cheap.
FAST = {
    "ddpm": [],
    "vp_sde": ["sampler.steps=8"],
    "subvp_sde": ["sampler=probability_flow", "sampler.rtol=1e-2", "sampler.atol=1e-2"],
    "ve_sde": ["sampler.steps=4", "process.sigma_max=5"],
    "ncsn": ["sampler.steps_per_level=2"],
}


@pytest.mark.parametrize("process", FAST)
def test_each_family_trains_and_its_checkpoint_samples(process, tmp_path):
    cfg = compose_train([*TINY, f"process={process}", *FAST[process]], tmp_path)
    val_loss = train(cfg)
    assert val_loss is not None and torch.isfinite(torch.tensor(val_loss))
    module = load_module(tmp_path / "checkpoints" / "last.ckpt")
    assert type(module.process).__name__ == cfg.module.process._target_.split(".")[-1] or (
        process == "ddpm"
    )
    steps = []
    x = module.sample(3, generator=torch.Generator().manual_seed(0), callback=steps.append)
    assert x.shape == (3, 1, 16, 16) and torch.isfinite(x).all() and steps[-1].nfe >= 2
    assert (tmp_path / "samples").is_dir()
    # the sampling entry point, with its denoising strip, on this family's checkpoint
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    info = sample([f"ckpt={ckpt}", "n=3", "batch_size=3", "strip_n=2"], tmp_path / "sampled")
    assert info["nfe"] == steps[-1].nfe and (tmp_path / "sampled" / "denoise.png").is_file()


@pytest.mark.parametrize(
    "process,sampler,ok",
    [
        (NCSN(), "diffusion.samplers.ddim", False),
        (VESDE(), "diffusion.samplers.ddpm_ancestral", False),
        (VESDE(), "diffusion.score_samplers.annealed_langevin", False),
        (VPSDE(), "diffusion.samplers.ddim", True),
        (VPSDE(), "diffusion.score_samplers.probability_flow", True),
        (NCSN(), "diffusion.score_samplers.annealed_langevin", True),
    ],
)
def test_samplers_that_do_not_suit_the_family_are_refused(process, sampler, ok):
    if ok:
        check_sampler(process, {"_target_": sampler})
    else:
        with pytest.raises(ConfigError, match="cannot sample a .* model; use one of"):
            check_sampler(process, {"_target_": sampler})


def test_a_vp_sde_model_sampled_by_ddim_on_the_sdes_own_chain_gets_the_data_right():
    """The VP-SDE's exact ε (labels 999 t), run through DDIM on the SDE's 1000-step chain
    (as_ddpm), is the chain's own exact ε at every step: same samples as DDPM's oracle."""
    sde = VPSDE()
    eps_model, process = as_ddpm(GaussianEpsOracle(sde, 0.4, 0.3), sde, 1000)
    x_T = torch.randn(250, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    out = ddim(eps_model, x_T, process, steps=1000)
    assert float(out.mean()) == pytest.approx(0.4, abs=0.006)
    assert float(out.std()) == pytest.approx(0.3, rel=0.02)
    chain_oracle = GaussianEpsOracle(process, 0.4, 0.3)
    for steps in (20, 100):
        expected = ddim(chain_oracle, x_T, process, steps=steps)
        assert torch.allclose(ddim(eps_model, x_T, process, steps=steps), expected, atol=2e-5)


def test_training_with_an_unsuitable_sampler_fails_at_start_up(tmp_path):
    from diffusion.config import build

    cfg = compose_train([*TINY, "process=ncsn", "sampler=ddim"], tmp_path)
    with pytest.raises(ConfigError, match="ddim cannot sample a NCSN model; use one of"):
        build(cfg.module, "module")


def test_an_fid_sampler_that_does_not_suit_the_family_fails_before_training(tmp_path):
    cfg = compose_train(
        [*TINY, "process=ve_sde", "callbacks.fid.every_n_steps=2",
         "+callbacks.fid.sampler={_target_:diffusion.samplers.ddim,_partial_:true,steps:3}"],
        tmp_path,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="ddim cannot sample a VESDE model"):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("sampler,options", [("euler_maruyama", {"steps": 500}),
                                             ("probability_flow", {})])  # fmt: skip
def test_a_ddpm_model_sampled_by_the_vp_sde_samplers_gets_the_data_right(
    schedule, sampler, options
):
    """DDPM's exact ε (integer steps, interpolated in log ᾱ between them) as a VP-SDE model."""
    from diffusion import schedules, score_samplers
    from diffusion.families import as_vp_sde
    from diffusion.process import GaussianDiffusion

    process = GaussianDiffusion(getattr(schedules, schedule)(1000))
    eps_model, sde = as_vp_sde(GaussianEpsOracle(process, 0.4, 0.3), process)
    if schedule == "linear":
        assert (sde.beta_min, sde.beta_max) == pytest.approx((0.1, 20.0))
    x_T = torch.randn(250, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    out = getattr(score_samplers, sampler)(
        eps_model, x_T, sde, generator=torch.Generator().manual_seed(1), **options
    )
    assert float(out.mean()) == pytest.approx(0.4, abs=0.006)
    assert float(out.std()) == pytest.approx(0.3, rel=0.015)


def test_fractional_steps_invert_the_interpolated_moments():
    from diffusion import schedules
    from diffusion.process import GaussianDiffusion

    process = GaussianDiffusion(schedules.cosine(50))
    t = torch.tensor([0.0, 0.25, 3.5, 17.9, 48.2, 49.0], dtype=torch.float64)
    m, sigma = process.moments_at_label(t)
    assert torch.allclose(m**2 + sigma**2, torch.ones_like(m))
    assert torch.allclose(process.fractional_step(m**2), t, atol=1e-9)
    integer = torch.tensor([0, 7, 49])
    assert torch.allclose(process.moments_at_label(integer.double())[0].float(),
                          process.moments_at_label(integer)[0])  # fmt: skip
