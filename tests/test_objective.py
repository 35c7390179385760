"""The training objective: targets × weightings against their formulas, the equivalences between
targets, the variational bound against bits/dim, and L_hybrid's stop-gradient."""

import math
import re

import pytest
import torch

from diffusion.evaluation.likelihood import bits_per_dim
from diffusion.processes import schedules
from diffusion.processes.analytic import GaussianOracle
from diffusion.processes.ddpm import GaussianDiffusion
from diffusion.processes.prediction import Predictor, target_value
from diffusion.processes.sde import VPSDE
from diffusion.training.objective import Objective
from diffusion.training.weighting import (
    P2,
    VLB,
    Likelihood,
    MinSNR,
    Simple,
    load_loss_weight,
    shipped,
)

PROCESS = GaussianDiffusion(schedules.linear(1000))
T_ENDS = torch.tensor([0, 1, 10, 250, 500, 998, 999])


def data(n: int = 7):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(n, 1, 4, 4, generator=g) * 2 - 1
    return x0, torch.randn(x0.shape, generator=g)


class Guess(torch.nn.Module):
    """A fixed, imperfect x̂_0 (a shrunk x_t), written in any target: the same prediction seen
    through ε, x_0 or v."""

    def __init__(self, process, target):
        super().__init__()
        self.process, self.target = process, target

    def forward(self, x_t, label):
        m, sigma = (v.to(x_t).reshape(-1, 1, 1, 1) for v in self.process.moments_at_label(label))
        x0_hat = 0.5 * x_t
        eps_hat = (x_t - m * x0_hat) / sigma
        return target_value(self.target, x0_hat, eps_hat, m, sigma)


def test_simple_eps_is_bitwise_algorithm_1():
    x0, eps = data()
    net = Guess(PROCESS, "eps")
    loss = Objective(PROCESS, "eps", Simple())(net, x0, T_ENDS, eps)
    ab = PROCESS.alpha_bar[T_ENDS].view(-1, 1, 1, 1)
    x_t = PROCESS.sqrt_alpha_bar[T_ENDS].view(-1, 1, 1, 1) * x0 + (
        PROCESS.sqrt_one_minus_alpha_bar[T_ENDS].view(-1, 1, 1, 1) * eps
    )
    expected = (eps - net(x_t, T_ENDS)).pow(2).flatten(1).mean(1)
    assert torch.equal(loss, expected)
    assert ab.min() > 0  # and the control: another ε gives another loss
    assert not torch.equal(Objective(PROCESS)(net, x0, T_ENDS, -eps), loss)


def per_target_losses(weight, process=PROCESS, t=T_ENDS):
    x0, eps = data(len(t))
    return {tg: Objective(process, tg, weight)(Guess(process, tg), x0, t, eps).double()
            for tg in ("eps", "x0", "v")}  # fmt: skip


def test_eps_mse_is_snr_times_the_x0_mse_for_the_same_batch():
    """ε - ε̂ = -(m / σ)(x_0 - x̂_0) at fixed x_t: ε-MSE = SNR · x_0-MSE (so the x_0-MSE is the
    ε-MSE weighted by 1 / SNR)."""
    loss = per_target_losses(Simple())
    snr = PROCESS.snr(T_ENDS.double())
    assert torch.allclose(loss["eps"], snr * loss["x0"], rtol=1e-4)
    assert torch.allclose(loss["v"], loss["x0"] * (snr + 1), rtol=1e-4)  # VP: v factor SNR + 1
    assert not torch.allclose(loss["eps"], loss["x0"], rtol=0.1)  # the control


@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weights_each_target_as_hang_et_al(gamma):
    """min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v, min(SNR, γ) for x_0 — the weights
    diffusers shipped wrong for v and x_0 — which are all the same loss on x̂_0."""
    simple, weighted = per_target_losses(Simple()), per_target_losses(MinSNR(gamma))
    snr = PROCESS.snr(T_ENDS.double())
    clipped = snr.clamp(max=gamma)
    expected = {"eps": clipped / snr, "v": clipped / (snr + 1), "x0": clipped}
    for target, w in expected.items():
        assert torch.allclose(weighted[target] / simple[target], w, rtol=1e-5), target
    assert torch.allclose(weighted["eps"], weighted["x0"], rtol=1e-4)
    assert torch.allclose(weighted["v"], weighted["x0"], rtol=1e-4)
    # SNR spans both sides of γ here, so the clipping is exercised
    assert (snr > gamma).any() and (snr < gamma).any()


def test_p2_is_choi_et_al():
    simple, weighted = per_target_losses(Simple()), per_target_losses(P2(k=1.0, gamma=0.5))
    snr = PROCESS.snr(T_ENDS.double())
    assert torch.allclose(weighted["eps"] / simple["eps"], (1 + snr) ** -0.5, rtol=1e-5)
    assert torch.allclose(weighted["x0"], weighted["eps"], rtol=1e-4)


def test_likelihood_weighting_is_g_squared_over_sigma_squared():
    sde = VPSDE()
    t = torch.tensor([1e-3, 0.1, 0.5, 1.0])
    simple, weighted = per_target_losses(Simple(), sde, t), per_target_losses(Likelihood(), sde, t)
    _, g = sde.coefficients(t.double())
    _, sigma = sde.marginal(t.double())
    assert torch.allclose(weighted["eps"] / simple["eps"], g**2 / sigma**2, rtol=1e-5)
    assert torch.allclose(weighted["v"], weighted["eps"], rtol=1e-4)


def test_vlb_weighting_averages_to_the_bound_that_bits_per_dim_reports():
    """The training loss of ``loss_weight=vlb`` at every t, with bits_per_dim's own draws of x_t,
    averages to its Σ_t L_t (everything but the prior term): training and evaluation share one
    bound."""
    process = GaussianDiffusion(schedules.linear(50))
    x = 0.1 + 0.3 * torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    x = ((x + 1) * 127.5).round() / 127.5 - 1
    net = GaussianOracle(process, 0.1, 0.3)
    terms = bits_per_dim(Predictor(net, process), x, "beta", torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    objective = Objective(process, "eps", VLB("beta"))
    total = torch.zeros(64)
    for step in range(process.T):
        eps = torch.randn(x.shape, generator=g)
        total += objective(net, x, torch.full((64,), step), eps) / process.T
    assert torch.allclose(total, terms["vb"] + terms["decoder"], rtol=1e-5)
    # the control: the bound of the other fixed variance is another number
    g = torch.Generator().manual_seed(1)
    other = sum(Objective(process, "eps", VLB("beta_tilde"))(
        net, x, torch.full((64,), step), torch.randn(x.shape, generator=g)) / process.T
        for step in range(process.T))  # fmt: skip
    assert (other - total).abs().mean() > 0.01


def test_hybrid_loss_trains_the_variance_and_not_the_mean_through_l_vlb():
    """L_hybrid = L_simple + λ L_vlb with a stop-gradient through the mean (Nichol & Dhariwal
    2021, Sec. 3.1): λ changes the gradient of the variance channels only."""
    x0, eps = data()
    raw = torch.nn.Parameter(torch.randn(len(T_ENDS), 2, 4, 4) * 0.1)

    def grads(vlb_weight):
        raw.grad = None
        objective = Objective(PROCESS, "eps", Simple(), learn_sigma=True, vlb_weight=vlb_weight)
        objective(lambda x_t, label: raw, x0, T_ENDS, eps).sum().backward()
        return raw.grad[:, :1].clone(), raw.grad[:, 1:].clone()

    (mean0, var0), (mean1, var1) = grads(0.0), grads(1.0)
    assert torch.equal(mean0, mean1)
    assert var0.abs().max() == 0 and var1.abs().max() > 0


def test_weightings_are_found_by_name_and_bad_names_list_the_options():
    min_snr = load_loss_weight("min_snr")
    assert isinstance(min_snr, MinSNR) and min_snr.gamma == 5
    assert {"simple", "min_snr", "p2", "vlb", "likelihood"} <= set(shipped())
    with pytest.raises(ValueError, match=re.escape(f"loss_weight must be one of {shipped()}, got")):
        load_loss_weight("min-snr")
    with pytest.raises(ValueError, match="gamma must be > 0"):
        MinSNR(gamma=0)
    assert math.isclose(P2().k, 1.0)


# ----- importance sampling of t (Nichol & Dhariwal 2021, Sec. 3.3) ------------------------------
def test_loss_aware_times_are_unbiased_and_lower_the_variance_of_l_vlb():
    """With p_t ∝ √E[L_t²] and weights 1/(T p_t), the estimate of Σ_t L_t / T keeps its mean and
    its variance falls; until every t has a full history, t is uniform."""
    from diffusion.training.time_sampling import LossAwareTimes

    T = 50
    L = torch.logspace(-3, 1, T, dtype=torch.float64)  # terms spread as the bound's are
    sampler = LossAwareTimes(T, history=2)
    assert torch.allclose(sampler.probabilities(), torch.full((T,), 1 / T, dtype=torch.float64))
    sampler.update(torch.arange(T).repeat(2), L.repeat(2))
    p = sampler.probabilities()
    assert torch.allclose(p, (L / L.sum()) * 0.999 + 0.001 / T)
    torch.manual_seed(0)
    t, weight = sampler.sample(200_000, "cpu")
    estimate = L[t] * weight.double()
    uniform = L[torch.randint(T, (200_000,))]
    assert float(estimate.mean()) == pytest.approx(float(L.mean()), rel=0.01)
    assert float(uniform.mean()) == pytest.approx(float(L.mean()), rel=0.02)
    assert estimate.var() < 0.1 * uniform.var()
    # the newest losses replace the oldest
    sampler.update(torch.tensor([3]), torch.tensor([7.0]))
    assert sampler.losses[3].tolist() == [float(L[3]), 7.0]


def test_loss_aware_training_keeps_its_history_in_the_checkpoint(tmp_path):
    from diffusion.checkpoints import load_module
    from diffusion.train import train

    from conftest import TINY, compose_train

    train(compose_train([*TINY, "loss_weight=vlb", "module.t_sampling=loss_aware"], tmp_path))
    module = load_module(tmp_path / "checkpoints" / "last.ckpt")
    assert int(module.time_sampler.count.sum()) == 4 * 8  # 4 steps of batch 8
    assert module.time_sampler.losses.abs().sum() > 0


def test_the_bound_with_a_learned_variance_trains_mean_and_variance_without_l_hybrid():
    """loss_weight=vlb with learn_sigma is Nichol & Dhariwal's L_vlb: the learned σ² enters the
    bound (the loss depends on v) and no λ L_vlb term is added on top (λ changes nothing)."""
    x0, eps = data()
    raw = torch.nn.Parameter(torch.randn(len(T_ENDS), 2, 4, 4) * 0.1)

    def loss(vlb_weight, v_shift=0.0):
        objective = Objective(PROCESS, "eps", VLB(), learn_sigma=True, vlb_weight=vlb_weight)
        net = lambda x_t, label: raw + torch.tensor([0.0, v_shift]).view(1, 2, 1, 1)  # noqa: E731
        return objective(net, x0, T_ENDS, eps)

    assert torch.equal(loss(0.0), loss(1.0))
    assert not torch.allclose(loss(0.0), loss(0.0, v_shift=0.5))
    raw.grad = None
    loss(0.0).sum().backward()
    assert raw.grad[:, :1].abs().max() > 0 and raw.grad[:, 1:].abs().max() > 0
