"""Every family (DDPM, VP/sub-VP/VE SDE, NCSN) trains through the real entry point, leaves a
checkpoint that samples, and refuses samplers that do not suit it."""

from __future__ import annotations

import pytest
import torch
from test_sample import sample

from diffusion import samplers
from diffusion.checkpoints import load_module
from diffusion.errors import ConfigError
from diffusion.processes import schedules
from diffusion.processes.analytic import GaussianOracle
from diffusion.processes.ddpm import GaussianDiffusion
from diffusion.processes.ncsn import NCSN
from diffusion.processes.prediction import Predictor
from diffusion.processes.sde import VESDE, VPSDE
from diffusion.samplers import check_sampler, suitable
from diffusion.train import train

from conftest import TINY, compose_train

# A few steps of each family with its default sampler, made cheap.
FAST = {
    "ddpm": [],
    "vp_sde": ["sampler.steps=8"],
    "subvp_sde": ["sampler=probability_flow", "sampler.rtol=1e-2", "sampler.atol=1e-2"],
    "ve_sde": ["sampler.steps=4", "process.sigma_max=5"],
    "ncsn": ["sampler.steps_per_level=2"],
    "edm": ["sampler.steps=3"],
}


@pytest.mark.parametrize("process", FAST)
def test_each_family_trains_and_its_checkpoint_samples(process, tmp_path):
    cfg = compose_train([*TINY, f"process={process}", *FAST[process]], tmp_path)
    val_loss = train(cfg)
    assert val_loss is not None and torch.isfinite(torch.tensor(val_loss))
    module = load_module(tmp_path / "checkpoints" / "last.ckpt")
    assert module.process.family == process
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
        (NCSN(), "diffusion.samplers.chain.ddim", False),
        (VESDE(), "diffusion.samplers.langevin.annealed_langevin", False),
        (GaussianDiffusion(schedules.linear(10)), "diffusion.samplers.langevin.annealed_langevin",
         False),
        (VESDE(), "diffusion.samplers.chain.ddpm_ancestral", True),
        (VPSDE(), "diffusion.samplers.chain.ddim", True),
        (VPSDE(), "diffusion.samplers.sde.probability_flow", True),
        (GaussianDiffusion(schedules.linear(10)), "diffusion.samplers.sde.euler_maruyama", True),
        (NCSN(), "diffusion.samplers.langevin.annealed_langevin", True),
        (NCSN(), "diffusion.score_samplers.annealed_langevin", True),  # an old checkpoint's path
    ],
)  # fmt: skip
def test_samplers_that_do_not_suit_the_family_are_refused(process, sampler, ok):
    if ok:
        assert check_sampler(process, {"_target_": sampler}).needs in process.offers
    else:
        with pytest.raises(ConfigError, match="cannot sample a process=.* model .*; use one of"):
            check_sampler(process, {"_target_": sampler})


def test_suitability_is_declared_not_looked_up_by_name():
    """Which samplers suit a process follows from what each declares: a process that offers a
    view gets every sampler that needs it, whatever its class is called."""

    class Renamed(VPSDE):
        family = "my_vp"

    assert suitable(Renamed()) == suitable(VPSDE())
    chain_only = VPSDE()
    chain_only.offers = frozenset({"chain"})
    assert suitable(chain_only) == ["ddim", "ddpm", "dpm_solver"]
    assert suitable(NCSN()) == ["annealed_langevin"]
    with pytest.raises(ConfigError, match="is not a sampler"):
        check_sampler(VPSDE(), {"_target_": "diffusion.processes.schedules.linear"})


def test_training_with_an_unsuitable_sampler_fails_at_start_up(tmp_path):
    from diffusion.config import build

    cfg = compose_train([*TINY, "process=ncsn", "sampler=ddim"], tmp_path)
    with pytest.raises(ConfigError, match="ddim cannot sample a process=ncsn model .*; use one of "
                                          "annealed_langevin"):  # fmt: skip
        build(cfg.module, "module")


def test_an_fid_sampler_that_does_not_suit_the_family_fails_before_training(tmp_path):
    cfg = compose_train(
        [*TINY, "process=ncsn", "callbacks.fid.every_n_steps=2",
         "+callbacks.fid.sampler={_target_:diffusion.samplers.ddim,_partial_:true,steps:3}"],
        tmp_path,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="ddim cannot sample a process=ncsn model"):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("sampler,options", [("euler_maruyama", {"steps": 500}),
                                             ("predictor_corrector", {"steps": 500}),
                                             ("probability_flow", {})])  # fmt: skip
def test_a_ddpm_model_sampled_by_the_sde_samplers_gets_the_data_right(schedule, sampler, options):
    """DDPM's own continuous-time view (log ᾱ linear between indices: a VP-SDE with piecewise
    constant b(t), exact for any schedule) under the exact ε, through the SDE samplers."""
    process = GaussianDiffusion(getattr(schedules, schedule)(1000))
    model = Predictor(GaussianOracle(process, 0.4, 0.3), process)
    x_T = torch.randn(250, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    steps = []
    out = getattr(samplers, sampler)(
        model, x_T, process, generator=torch.Generator().manual_seed(1), callback=steps.append,
        **options,
    )  # fmt: skip
    assert float(out.mean()) == pytest.approx(0.4, abs=0.006)
    assert float(out.std()) == pytest.approx(0.3, rel=0.03 if sampler == "predictor_corrector"
                                              else 0.015)  # fmt: skip
    if sampler == "probability_flow":  # adaptive: a handful of evaluations, not hundreds
        assert steps[-1].nfe < 300


def test_ddpm_kernel_between_indices_and_its_sde_agree():
    """m(t) = √ᾱ at integer t and log ᾱ linear between; f = d log m / dt and g² = dσ²/dt - 2fσ²
    (the SDE whose marginals are the kernel), checked by finite differences inside intervals."""
    process = GaussianDiffusion(schedules.cosine(50))
    t = torch.tensor([0.0, 0.25, 3.5, 17.9, 48.2, 49.0], dtype=torch.float64)
    m, sigma = process.marginal(t)
    assert torch.allclose(m**2 + sigma**2, torch.ones_like(m))
    assert torch.allclose(process.fractional_step(m**2), t, atol=1e-9)
    integer = torch.tensor([0, 7, 49])
    m_float, m_int = process.marginal(integer.double())[0], process.marginal(integer)[0]
    assert torch.allclose(m_float.float(), m_int)
    assert torch.allclose(process.marginal(integer)[0], process.sqrt_alpha_bar[integer])
    assert float(process.marginal(torch.tensor([-1.0], dtype=torch.float64))[1]) == 0.0  # data
    inside = torch.tensor([0.3, 3.5, 17.6, 48.5], dtype=torch.float64)
    h = 1e-6
    (m1, s1), (m2, s2) = process.marginal(inside - h), process.marginal(inside + h)
    f, g = process.coefficients(inside)
    assert torch.allclose(f, (m2.log() - m1.log()) / (2 * h), rtol=1e-5)
    var = process.marginal(inside)[1] ** 2
    assert torch.allclose(g**2, (s2**2 - s1**2) / (2 * h) - 2 * f * var, rtol=1e-4)
    # the step of the reverse-diffusion predictor: DDPM's own, a² = ᾱ_t / ᾱ_{t-1} = 1 - β_t
    a, G = process.discretize(torch.tensor([7.0], dtype=torch.float64), 1.0)
    assert float(a**2) == pytest.approx(1 - float(process.beta64[7]), rel=1e-12)
    assert float(a**2 + G**2) == pytest.approx(1.0, rel=1e-12)
