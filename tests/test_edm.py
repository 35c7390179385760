"""EDM (Karras et al. 2022): the preconditioned denoiser against Table 1, its loss against Eq. 8,
the process, Karras' σ steps, Heun's and Euler's orders on an ODE with a known solution, and
the samplers on every family, driven by the exact denoiser for Gaussian data."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest
import torch

from diffusion.errors import ConfigError
from diffusion.processes import schedules
from diffusion.processes.analytic import GaussianOracle
from diffusion.processes.ddpm import GaussianDiffusion
from diffusion.processes.edm import EDM
from diffusion.processes.kernel import SDEView
from diffusion.processes.ncsn import NCSN
from diffusion.processes.prediction import EDMPrecond, Predictor
from diffusion.processes.sde import VESDE, VPSDE, SubVPSDE
from diffusion.samplers import check_sampler, euler, heun
from diffusion.samplers.karras import karras_sigmas
from diffusion.train import train
from diffusion.training.objective import Objective
from diffusion.training.weighting import Simple

from conftest import TINY, compose_train

MU, S = 0.4, 0.3  # data ~ N(0.4, 0.3²)
SIGMAS = torch.tensor([0.002, 0.1, 0.5, 1.0, 10.0, 80.0], dtype=torch.float64)


def net(inputs: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """A fixed nonlinear stand-in for F_θ, so that every coefficient shows in its output."""
    return torch.tanh(2 * inputs) + 0.3 * label.reshape(-1, *[1] * (inputs.ndim - 1))


# ----- the preconditioning (Table 1) and the loss (Eq. 8) -------------------------------------
def test_the_preconditioning_is_table_1():
    sd = 0.5
    c_skip, c_out, c_in = EDMPrecond(sd).coefficients(SIGMAS)
    s2 = SIGMAS**2
    assert torch.allclose(c_skip, sd**2 / (s2 + sd**2), rtol=1e-12)
    assert torch.allclose(c_out, SIGMAS * sd / (s2 + sd**2).sqrt(), rtol=1e-12)
    assert torch.allclose(c_in, 1 / (s2 + sd**2).sqrt(), rtol=1e-12)
    # at σ = σ_data, by hand: c_skip = ½, c_out = σ_d / √2, c_in = 1 / (σ_d √2)
    half = EDMPrecond(sd).coefficients(torch.tensor([0.5], dtype=torch.float64))
    assert [round(float(c), 6) for c in half] == [0.5, 0.353553, 1.414214]
    # the control: another σ_data gives other coefficients
    assert not torch.allclose(EDMPrecond(1.0).coefficients(SIGMAS)[0], c_skip)
    # c_noise = ¼ ln σ is EDM's network label
    assert torch.allclose(EDM().label(SIGMAS), 0.25 * SIGMAS.log(), rtol=1e-12)


@pytest.mark.parametrize(
    "process", [EDM(), GaussianDiffusion(schedules.linear(100))], ids=["edm", "ddpm"]
)
def test_the_denoiser_is_c_skip_x_plus_c_out_F_of_c_in_x_on_any_kernel(process):
    """D(x̃; σ̃) = c_skip x̃ + c_out F(c_in x̃; label) with x̃ = x_t / m, σ̃ = σ / m: for EDM's
    kernel (m = 1) and for DDPM's (the preconditioning EDM applies to pre-trained VP models)."""
    g = torch.Generator().manual_seed(0)
    edm = process.family == "edm"
    t = torch.tensor([0.01, 0.7, 30.0] if edm else [3.0, 40.0, 99.0], dtype=torch.float64)
    x_t = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    m, sigma = (v.double().reshape(-1, 1, 1, 1) for v in process.marginal(t))
    x_tilde, sigma_tilde = x_t / m, sigma / m
    sd2 = 0.25
    c_skip, c_out = sd2 / (sigma_tilde**2 + sd2), sigma_tilde * 0.5 / (sigma_tilde**2 + sd2).sqrt()
    c_in = 1 / (sigma_tilde**2 + sd2).sqrt()
    expected = c_skip * x_tilde + c_out * net(c_in * x_tilde, process.label(t))
    got = Predictor(net, process, "edm")(x_t, t)
    assert torch.allclose(got.x0_hat, expected, rtol=1e-10)
    assert torch.allclose(got.eps_hat, (x_tilde - expected) / sigma_tilde, rtol=1e-8)
    # the control: the same network read as an ε-predictor says something else
    assert not torch.allclose(Predictor(net, process, "eps")(x_t, t).x0_hat, expected, atol=1e-3)


def test_l_simple_on_F_is_edms_loss_lambda_times_the_denoiser_error():
    """Eq. 8: λ(σ) ‖D(x_0 + σ n; σ) - x_0‖² with λ = (σ² + σ_d²) / (σ σ_d)²."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    n = torch.randn(4, 1, 4, 4, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.3, 2.0, 50.0], dtype=torch.float64)
    loss = Objective(EDM(), "edm", Simple())(net, x0, t=sigma, eps=n)
    s = sigma.reshape(-1, 1, 1, 1)
    x = x0 + s * n
    c_skip, c_out, c_in = (
        0.25 / (s**2 + 0.25),
        s * 0.5 / (s**2 + 0.25).sqrt(),
        1 / (s**2 + 0.25).sqrt(),
    )
    d = c_skip * x + c_out * net(c_in * x, 0.25 * sigma.log())
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    expected = lam * (d - x0).pow(2).flatten(1).mean(1)
    assert torch.allclose(loss, expected, rtol=1e-9)
    assert not torch.allclose(loss, (d - x0).pow(2).flatten(1).mean(1), rtol=1e-2)  # λ matters


def test_the_exact_denoiser_for_gaussian_data_is_the_posterior_mean():
    """D*(x; σ) = μ + s² (x - μ) / (s² + σ²), read through the Predictor from the oracle F*."""
    process = EDM()
    x = torch.randn(6, 1, 2, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sigma = SIGMAS
    d = Predictor(GaussianOracle(process, MU, S, "edm"), process, "edm")(x, sigma).x0_hat
    s2 = sigma.reshape(-1, 1, 1, 1) ** 2
    assert torch.allclose(d, MU + S**2 * (x - MU) / (S**2 + s2), rtol=1e-9, atol=1e-12)
    other = Predictor(GaussianOracle(process, MU, 2 * S, "edm"), process, "edm")(x, sigma).x0_hat
    assert not torch.allclose(other, d, atol=1e-3)


# ----- the process --------------------------------------------------------------------------
def test_training_sigmas_are_log_normal_and_validation_sigmas_are_their_quantiles():
    process = EDM(P_mean=-1.2, P_std=1.2)
    log_sigma = process.sample_t(200_000, generator=torch.Generator().manual_seed(0)).log()
    assert float(log_sigma.mean()) == pytest.approx(-1.2, abs=0.01)  # standard error 0.003
    assert float(log_sigma.std()) == pytest.approx(1.2, rel=0.01)
    quantiles = [NormalDist(-1.2, 1.2).inv_cdf((i + 0.5) / 10) for i in range(10)]
    assert torch.allclose(process.validation_times(10).double().log(),
                          torch.tensor(quantiles, dtype=torch.float64), atol=1e-5)  # fmt: skip


FAMILIES = {
    "ddpm-linear": lambda: GaussianDiffusion(schedules.linear(1000)),
    "ddpm-cosine": lambda: GaussianDiffusion(schedules.cosine(1000)),
    "vp_sde": VPSDE,
    "subvp_sde": SubVPSDE,
    "ve_sde": VESDE,
    "edm": EDM,
}


@pytest.mark.parametrize("family", FAMILIES)
def test_time_at_inverts_sigma_tilde_on_every_family(family):
    process = FAMILIES[family]()
    t = torch.linspace(process.t_min, process.t_max, 57, dtype=torch.float64)
    sigma_tilde = process.sigma_tilde(t)
    assert torch.allclose(process.time_at(sigma_tilde), t, rtol=1e-7, atol=1e-7 * process.t_max)
    # the closed forms agree with plain bisection on σ̃(t), and a larger σ̃ is a later time
    assert torch.allclose(SDEView.time_at(process, sigma_tilde), t, rtol=1e-7, atol=1e-6)
    inner = sigma_tilde[1:-1]
    assert (process.time_at(inner * 1.1) > t[1:-1]).all()


# ----- Karras' steps (Eq. 5) ----------------------------------------------------------------
def test_karras_sigmas_are_evenly_spaced_in_sigma_to_the_one_over_rho():
    sigmas = torch.tensor(karras_sigmas(8, 0.002, 80.0, 7.0), dtype=torch.float64)
    assert float(sigmas[0]) == pytest.approx(80.0, rel=1e-12)
    assert float(sigmas[-1]) == pytest.approx(0.002, rel=1e-12)
    gaps = torch.diff(sigmas ** (1 / 7))
    assert torch.allclose(gaps, gaps[0].expand_as(gaps), rtol=1e-10)
    assert (torch.diff(sigmas) < 0).all()
    # ρ = 1 is even in σ itself; ρ = 7 crowds the steps near σ_min (the control)
    linear = karras_sigmas(5, 1.0, 5.0, 1.0)
    assert linear == pytest.approx([5.0, 4.0, 3.0, 2.0, 1.0], rel=1e-12)
    assert karras_sigmas(5, 1.0, 5.0, 7.0)[2] < 3.0
    assert karras_sigmas(1, 0.002, 80.0) == [80.0]


# ----- Heun's and Euler's orders -------------------------------------------------------------
def _error_at_sigma_min(fn, process, steps: int) -> float:
    """Max |x̃(σ_min) - exact| after ``steps`` of ``fn`` from σ_max = 80 to σ_min = 0.02.

    For N(μ, s²) data, dx̃/dσ = (x̃ - D*(x̃; σ)) / σ = σ (x̃ - μ) / (s² + σ²), so
    x̃(σ) - μ = (x̃(σ_max) - μ) √((s² + σ²) / (s² + σ_max²)) exactly.
    """
    low, high = 0.02, 80.0
    x_T = torch.randn(200, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = MU + (x_T * high - MU) * math.sqrt((S**2 + low**2) / (S**2 + high**2))
    model = Predictor(GaussianOracle(process, MU, S, "edm"), process, "edm")
    seen = []
    fn(model, x_T, process, steps=steps, sigma_min=low, sigma_max=high, callback=seen.append)
    t_low = process.time_at(torch.tensor([low], dtype=torch.float64))
    m_low = float(process.marginal(t_low)[0])
    return float((seen[-2].x_next / m_low - exact).abs().max())  # the step that lands on σ_min


@pytest.mark.parametrize("fn,order", [(heun, 2), (euler, 1)], ids=["heun", "euler"])
def test_heun_is_second_order_and_euler_first_order(fn, order):
    steps = [10, 20, 40, 80]
    errors = [_error_at_sigma_min(fn, EDM(), n) for n in steps]
    slope = np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert -order - 0.35 < slope < -order + 0.1, (slope, errors)
    # the same ODE in σ̃ on DDPM's kernel (EDM's sampling of a pre-trained VP model)
    ddpm = GaussianDiffusion(schedules.linear(1000))
    assert _error_at_sigma_min(fn, ddpm, 20) == pytest.approx(errors[1], rel=1e-4)


def test_nfe_churn_and_determinism():
    process = EDM()
    model = Predictor(GaussianOracle(process, MU, S, "edm"), process, "edm")
    x_T = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    for fn, nfe in ((heun, 2 * 9 - 1), (euler, 9)):
        seen = []
        a = fn(model, x_T, process, steps=9, generator=torch.Generator().manual_seed(1),
               callback=seen.append)  # fmt: skip
        assert seen[-1].nfe == nfe and len(seen) == 9
        b = fn(model, x_T, process, steps=9, generator=torch.Generator().manual_seed(2))
        assert torch.equal(a, b)  # S_churn = 0: deterministic given x_T
        churned = [
            fn(
                model,
                x_T,
                process,
                steps=9,
                S_churn=20.0,
                generator=torch.Generator().manual_seed(k),
            )
            for k in (1, 1, 2)
        ]
        assert torch.equal(churned[0], churned[1]) and not torch.equal(churned[0], churned[2])
        assert not torch.equal(churned[0], a)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("churn", [0.0, 40.0], ids=["ode", "churn"])
def test_heun_reproduces_gaussian_data_on_every_family(family, churn):
    """100 steps (200 with churn) of the exact denoiser give the data's mean and std (8,000
    values: standard errors 0.0034 and 0.8 %; bounds at about 4 of them), deterministic or
    stochastic. (At 18 steps the std is 7 % high for data this narrow, s = 0.3 against
    σ_max = 80: the discretization error the order test measures.)"""
    process = FAMILIES[family]()
    x_T = torch.randn(2000, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    model = Predictor(GaussianOracle(process, MU, S, "eps"), process, "eps")
    steps = 100 if churn == 0 else 200
    out = heun(model, x_T, process, steps=steps, S_churn=churn, S_tmin=0.05, S_tmax=50.0,
               generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert float(out.mean()) == pytest.approx(MU, abs=0.014)
    assert float(out.std()) == pytest.approx(S, rel=0.035)


@pytest.mark.parametrize("family", FAMILIES)
def test_euler_reproduces_gaussian_data_on_every_family(family):
    """First order: 400 steps for the std within 3.5 % (at 100 it is 3-7 % low, as the order
    test's error predicts)."""
    process = FAMILIES[family]()
    x_T = torch.randn(2000, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    out = euler(Predictor(GaussianOracle(process, MU, S), process), x_T, process, steps=400)
    assert float(out.mean()) == pytest.approx(MU, abs=0.014)
    assert float(out.std()) == pytest.approx(S, rel=0.035)


def test_a_wrong_denoiser_gives_the_wrong_distribution():
    """The control of the test above: the exact denoiser of other data gives that data."""
    process = EDM()
    x_T = torch.randn(2000, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    model = Predictor(GaussianOracle(process, MU, 2 * S, "eps"), process, "eps")
    assert float(heun(model, x_T, process, steps=100).std()) == pytest.approx(2 * S, rel=0.035)


# ----- suitability and bad input ------------------------------------------------------------
def test_heun_on_ncsns_discrete_levels_is_refused_naming_the_samplers_that_suit():
    with pytest.raises(ConfigError, match=r"sampler heun cannot sample a process=ncsn model.*"
                       r"use one of annealed_langevin"):  # fmt: skip
        check_sampler(NCSN(), {"_target_": "diffusion.samplers.karras.heun"})
    for process in (EDM(), VESDE(), GaussianDiffusion(schedules.linear(10))):
        assert check_sampler(process, {"_target_": "diffusion.samplers.karras.heun"}) is heun


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["sampler.sigma_min=10", "sampler.sigma_max=1"],
         r"sampler: need 0 < sigma_min < sigma_max, got sigma_min=10.0, sigma_max=1.0"),
        (["sampler.sigma_max=500"], r"sampler: sigma_min=0.002 and sigma_max=500 must lie in the "
                                    r"process's range \[0.002, 80\]"),
        (["sampler.rho=0"], "sampler: rho must be > 0, got 0"),
        (["sampler.S_churn=-1"], "sampler: S_churn must be >= 0, got -1"),
        (["sampler.steps=0"], "sampler: steps must be an integer >= 1, got 0"),
        (["process.sigma_min=80", "process.sigma_max=1"],
         "need 0 < sigma_min < sigma_max, got sigma_min=80"),
    ],
)  # fmt: skip
def test_bad_edm_options_fail_at_start_up_naming_the_key(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        train(compose_train([*TINY, "process=edm", *overrides], tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_process_edm_selects_the_preconditioned_denoiser_and_heun():
    cfg = compose_train(["process=edm"])
    assert cfg.module.prediction == "edm" and cfg.sampler._target_.endswith("karras.heun")
    assert cfg.module.process.sigma_max == 80.0 and cfg.module.process.P_mean == -1.2
    # a user's own choice still wins
    assert compose_train(["process=edm", "module.prediction=eps"]).module.prediction == "eps"
