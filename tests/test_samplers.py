"""Chain samplers driven by the exact predictor for Gaussian data must reproduce the data."""

import pytest
import torch

from diffusion.processes import schedules
from diffusion.processes.analytic import GaussianOracle
from diffusion.processes.ddpm import GaussianDiffusion
from diffusion.processes.edm import EDM
from diffusion.processes.prediction import Predictor
from diffusion.processes.sde import VESDE, VPSDE, SubVPSDE
from diffusion.samplers import Step, ddim, ddim_encode, ddpm_ancestral, dpm_solver
from diffusion.samplers.chain import posterior, visited_times

MU, S = 0.4, 0.3  # data ~ N(0.4, 0.3²), well inside [-1, 1]
N = 20_000


def oracle(process, target="eps", learn_sigma=False, mean=MU, std=S) -> Predictor:
    """The exact network for N(mean, std²) data, seen through the process as a sampler sees it."""
    net = GaussianOracle(process, mean, std, target, learn_sigma)
    return Predictor(net, process, target, learn_sigma)


def exact_output_moments(schedule, T, variance):
    """Mean and std of Algorithm 2's output under ε*, by the linear-Gaussian recursion (float64).

    With ε* linear in x_t, each step is x_{t-1} = A_t x_t + c_t + σ_t z, so the moments follow
    m ← A m + c, v ← A² v + σ², from x_T ~ N(0, 1). Written from Ho et al.'s constants, not
    from the sampler's kernel arithmetic, so it checks that too.
    """
    beta = schedule(T)
    alpha = 1 - beta
    ab = torch.cumprod(alpha, 0)
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    m, v = 0.0, 1.0
    for t in reversed(range(T)):
        k = (1 - ab[t]).sqrt() / (ab[t] * S**2 + 1 - ab[t])  # ε* = k (x_t - √ᾱ μ)
        sra, srm1 = ab[t].rsqrt(), (1 / ab[t] - 1).sqrt()
        coef_x0 = beta[t] * ab_prev[t].sqrt() / (1 - ab[t])
        coef_xt = (1 - ab_prev[t]) * alpha[t].sqrt() / (1 - ab[t])
        A = coef_x0 * (sra - srm1 * k) + coef_xt
        c = coef_x0 * srm1 * k * ab[t].sqrt() * MU
        var = beta[t] if variance == "beta" else (1 - ab_prev[t]) / (1 - ab[t]) * beta[t]
        m, v = A * m + c, A**2 * v + (var if t > 0 else 0.0)
    return float(m), float(v) ** 0.5


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
@pytest.mark.parametrize(
    "schedule,T", [(schedules.linear, 1000), (schedules.cosine, 1000), (schedules.linear, 100)]
)
def test_ancestral_sampling_reproduces_gaussian_data(variance, schedule, T):
    process = GaussianDiffusion(schedule(T))
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(N, 1, 2, 2, generator=g)
    x0 = ddpm_ancestral(
        oracle(process), x_T, process, variance=variance, clip_x0=False, generator=g
    )
    # 1) the implementation: empirical moments of 80k values match the chain's exact moments
    #    (standard errors: 0.001 for the mean, 0.25 % for the std; bounds at 5 and 6 of them).
    exact_mean, exact_std = exact_output_moments(schedule, T, variance)
    assert x0.mean().item() == pytest.approx(exact_mean, abs=0.005)
    assert x0.std().item() == pytest.approx(exact_std, rel=0.015)
    # 2) the method: at T = 1000 the chain reproduces the data within 2 %; at T = 100 the two
    #    choices of σ² bracket it (Ho et al. Sec. 3.2: β and β̃ are the upper and lower extremes).
    assert exact_mean == pytest.approx(MU, abs=1e-3)
    if T == 1000:
        assert exact_std == pytest.approx(S, rel=0.02)
    elif variance == "beta":
        assert S < exact_std < 1.05 * S
    else:
        assert 0.85 * S < exact_std < S


def test_same_seed_same_samples_and_callback_sees_every_step():
    process = GaussianDiffusion(schedules.linear(20))
    steps: list[Step] = []
    x_T = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    model = oracle(process)
    a = ddpm_ancestral(
        model, x_T, process, generator=torch.Generator().manual_seed(1), callback=steps.append
    )
    b = ddpm_ancestral(model, x_T, process, generator=torch.Generator().manual_seed(1))
    c = ddpm_ancestral(model, x_T, process, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert [s.t for s in steps] == list(range(19, -1, -1))
    assert [s.nfe for s in steps] == list(range(1, 21))
    assert torch.equal(steps[-1].x_next, a)


def test_no_noise_at_the_last_step():
    """At t = 0 the sampler returns the posterior mean: the result does not depend on the noise."""
    process = GaussianDiffusion(schedules.linear(1))  # a single step: t = 0 only
    model = oracle(process)
    x_T = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    a = ddpm_ancestral(model, x_T, process, generator=torch.Generator().manual_seed(1))
    b = ddpm_ancestral(model, x_T, process, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    # the mean into the data is x̂_0 itself: x_0 = (x_T - √β_0 ε*) / √(1 - β_0), clipped
    beta0 = float(process.beta64[0])
    eps = GaussianOracle(process, MU, S)(x_T, torch.zeros(8, dtype=torch.long))
    expected = ((x_T - beta0**0.5 * eps) / (1 - beta0) ** 0.5).clamp(-1, 1)
    assert torch.allclose(a, expected, atol=1e-6)


def test_the_kernel_posterior_is_ddpms_for_adjacent_indices():
    """The chain samplers' generic step from t to s (Kingma et al. 2021) is Ho et al.'s Eq. 7
    for adjacent code indices, and the respaced β' = 1 - ᾱ_t / ᾱ_s otherwise."""
    process = GaussianDiffusion(schedules.cosine(50))
    ab = torch.cumprod(1 - process.beta64, 0)
    for t, s in ((10, 9), (40, 39), (1, 0)):
        post = posterior(ab[t].sqrt(), (1 - ab[t]).sqrt(), ab[s].sqrt(), (1 - ab[s]).sqrt())
        assert float(post["var_ts"]) == pytest.approx(float(process.beta64[t]), rel=1e-9)
        assert float(post["var"]) == pytest.approx(float(process.posterior_var[t]), rel=1e-5)
        assert float(post["coef_x0"]) == pytest.approx(float(process.posterior_coef_x0[t]), 1e-5)
        assert float(post["coef_xt"]) == pytest.approx(float(process.posterior_coef_xt[t]), 1e-5)
    post = posterior(ab[40].sqrt(), (1 - ab[40]).sqrt(), ab[20].sqrt(), (1 - ab[20]).sqrt())
    assert float(post["var_ts"]) == pytest.approx(float(1 - ab[40] / ab[20]), rel=1e-9)
    # into the data (m = 1, σ = 0): all weight on x̂_0, no variance
    assert posterior(0.5, 0.8, 1.0, 0.0) == {"coef_xt": 0.0, "coef_x0": 1.0, "var": 0.0,
                                              "var_ts": pytest.approx(0.8**2)}  # fmt: skip


# ----- fast samplers ---------------------------------------------------------------------------
def gaussian_setup(T: int = 1000, schedule=schedules.linear):
    process = GaussianDiffusion(schedule(T))
    x_T = torch.randn(N, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    return process, oracle(process), x_T


@pytest.mark.parametrize(
    "sampler,options,tol",
    [
        (ddim, {"steps": 1000, "eta": 0.0}, 0.02),  # the probability-flow ODE, finely
        (ddim, {"steps": 1000, "eta": 1.0}, 0.02),  # = DDPM with β̃
        (ddim, {"steps": 500, "eta": 0.5, "spacing": "trailing"}, 0.03),
        (dpm_solver, {"steps": 50}, 0.02),
        (ddpm_ancestral, {"steps": 100, "clip_x0": False}, 0.08),  # respaced, σ² = β: slightly wide
    ],
)
def test_fast_samplers_reproduce_gaussian_data(sampler, options, tol):
    process, model, x_T = gaussian_setup()
    nfe = []
    x0 = sampler(
        model,
        x_T,
        process,
        generator=torch.Generator().manual_seed(1),
        callback=lambda s: nfe.append(s.nfe),
        **options,
    )
    assert x0.mean().item() == pytest.approx(MU, abs=0.01)
    assert x0.std().item() == pytest.approx(S, rel=tol)
    assert nfe[-1] == options["steps"]  # every sampler reports its network evaluations


@pytest.mark.parametrize("schedule", [schedules.linear, schedules.cosine])
@pytest.mark.parametrize("spacing", ["logsnr", "trailing"])
def test_dpm_solver_beats_ddim_at_20_nfe(schedule, spacing):
    process, model, x_T = gaussian_setup(schedule=schedule)
    err_ddim = abs(ddim(model, x_T, process, steps=20, spacing=spacing).std().item() - S)
    err_dpm = abs(dpm_solver(model, x_T, process, steps=20, spacing=spacing).std().item() - S)
    assert err_dpm < err_ddim
    if spacing == "logsnr":
        # measured 1.4 % (linear) and 2.9 % (cosine); DDIM's error at 20 steps is 5-9 %
        assert err_dpm < 0.04 * S


def test_ddim_eta0_is_deterministic():
    process, model, x_T = gaussian_setup(T=100)
    a = ddim(model, x_T[:64], process, steps=10, generator=torch.Generator().manual_seed(1))
    b = ddim(model, x_T[:64], process, steps=10, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    c = ddim(
        model, x_T[:64], process, steps=10, eta=1.0, generator=torch.Generator().manual_seed(2)
    )
    assert not torch.equal(a, c)


def test_visited_times_are_the_spacing_of_the_chain():
    process = GaussianDiffusion(schedules.linear(1000))
    assert visited_times(process, None, "uniform") == list(range(999, -1, -1))
    assert visited_times(process, 10, "uniform") == list(range(900, -1, -100))
    sde = VPSDE(N=11)
    assert visited_times(sde, 11, "uniform") == pytest.approx(
        torch.linspace(1e-3, 1.0, 11).flip(0).tolist()
    )


@pytest.mark.parametrize("steps,rms_tol", [(100, 0.03), (1000, 0.003)])
def test_ddim_encode_then_decode_returns_x0(steps, rms_tol):
    process, model, _ = gaussian_setup()
    x0 = MU + S * torch.randn(2000, 1, 2, 2, generator=torch.Generator().manual_seed(5))
    x_T = ddim_encode(model, x0, process, steps=steps)
    assert x_T.std().item() == pytest.approx(1.0, abs=0.1)  # the encoding looks like the prior
    back = ddim(model, x_T, process, steps=steps)
    assert (back - x0).pow(2).mean().sqrt().item() < rms_tol


# ----- every chain sampler on every family, in every prediction target --------------------------
FAMILIES = {
    "ddpm-linear": lambda: GaussianDiffusion(schedules.linear(1000)),
    "ddpm-cosine": lambda: GaussianDiffusion(schedules.cosine(1000)),
    "vp_sde": VPSDE,
    "subvp_sde": SubVPSDE,
    "ve_sde": lambda: VESDE(sigma_max=50.0),
    "edm": EDM,
}
CHAIN = {
    "ancestral-100": (ddpm_ancestral, {"steps": 100, "clip_x0": False}),
    "ddim-50": (ddim, {"steps": 50}),
    "dpm_solver-20": (dpm_solver, {"steps": 20}),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sampler", CHAIN)
def test_every_target_gives_the_same_samples_as_the_exact_eps(family, sampler):
    """The exact optimal network written in ε, x_0, v or EDM's F, through the Predictor, gives
    the ε network's samples to float tolerance; a network of other data gives other samples."""
    process = FAMILIES[family]()
    fn, options = CHAIN[sampler]
    x_T = torch.randn(500, 1, 2, 2, generator=torch.Generator().manual_seed(0))

    def run(target, mean=MU):
        return fn(oracle(process, target, mean=mean), x_T, process,
                  generator=torch.Generator().manual_seed(1), **options)  # fmt: skip

    eps = run("eps")
    for target in ("x0", "v", "edm"):
        assert torch.allclose(run(target), eps, atol=2e-4), target
    assert (run("v", mean=-MU) - eps).abs().mean() > 0.5  # the control


FINE = {
    "ancestral": (ddpm_ancestral, {"steps": None, "clip_x0": False}),
    "ddim-500": (ddim, {"steps": 500}),
    "dpm_solver-50": (dpm_solver, {"steps": 50}),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sampler", FINE)
def test_every_chain_sampler_reproduces_the_data_on_every_family(family, sampler):
    """DDPM's samplers on a VP, sub-VP or VE kernel with no bridge: the exact ε gives the data's
    mean and std (8,000 values: standard errors 0.001 and 0.8 %; bounds at about 4 of them)."""
    process = FAMILIES[family]()
    fn, options = FINE[sampler]
    x_T = torch.randn(2000, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    out = fn(oracle(process), x_T, process, generator=torch.Generator().manual_seed(1), **options)
    assert float(out.mean()) == pytest.approx(MU, abs=0.006)
    assert float(out.std()) == pytest.approx(S, rel=0.035)


# ----- learned variance (Nichol & Dhariwal 2021) ------------------------------------------------
def test_the_exact_learned_variance_makes_a_short_chain_exact():
    """With the exact reverse variance Var(x_{t-1} | x_t) (Gaussian data), ancestral sampling on a
    10-step chain reproduces the data; the fixed choices β and β̃ bracket it (Ho et al. Sec. 3.2),
    so a learned Σ is what makes few-step ancestral sampling right."""
    process = GaussianDiffusion(schedules.linear(10))
    x_T = torch.randn(N, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    std = {}
    for name, model, variance in (
        ("learned", oracle(process, learn_sigma=True), "beta"),
        ("beta", oracle(process), "beta"),
        ("beta_tilde", oracle(process), "beta_tilde"),
    ):
        out = ddpm_ancestral(model, x_T, process, variance=variance, clip_x0=False,
                             generator=torch.Generator().manual_seed(1))  # fmt: skip
        assert float(out.mean()) == pytest.approx(MU, abs=0.01)
        std[name] = float(out.std())
    # Algorithm 2 ends with the mean E[x_0 | x_0'] (code index 0, no noise), which lacks
    # Var(x_0 | x_0') = s² σ_0² / (m_0² s² + σ_0²) of the data's variance: otherwise exact
    ab0 = 1 - float(process.beta64[0])
    expected = (S**2 - S**2 * (1 - ab0) / (ab0 * S**2 + 1 - ab0)) ** 0.5
    assert std["learned"] == pytest.approx(expected, rel=0.01)  # 4 standard errors
    assert std["beta_tilde"] < 0.95 * S and std["beta"] > 1.05 * S


def test_a_respaced_chain_interpolates_its_own_bounds():
    """improved-diffusion's respacing: the learned fraction interpolates the *respaced* step's
    log β' and log β̃', here checked on the variance the sampler adds at its first step."""
    process = GaussianDiffusion(schedules.linear(1000))
    model = oracle(process, learn_sigma=True)
    x_T = torch.randn(N, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    steps: list[Step] = []
    ddpm_ancestral(model, x_T, process, steps=10, clip_x0=False, callback=steps.append,
                   generator=torch.Generator().manual_seed(1))  # fmt: skip
    first = steps[0]
    t, s = (int(v) for v in visited_times(process, 10, "uniform")[:2])
    ab = torch.cumprod(1 - process.beta64, 0)
    post = posterior(ab[t].sqrt(), (1 - ab[t]).sqrt(), ab[s].sqrt(), (1 - ab[s]).sqrt())
    frac = model(x_T, torch.full((N,), float(t), dtype=torch.float64)).var_frac.mean()
    expected = torch.exp(frac * torch.log(post["var_ts"]) + (1 - frac) * torch.log(post["var"]))
    mean = post["coef_xt"] * first.x_t + post["coef_x0"] * first.x0_hat
    added = (first.x_next - mean).var()
    assert float(added) == pytest.approx(float(expected), rel=0.03)
    # the original chain's bounds at t would give a variance ~100x too small
    assert float(process.beta64[t]) < 0.05 * float(expected)
