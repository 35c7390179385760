"""Classifier-free guidance (diffusion.processes.guidance) driven by the exact class-conditional
network for Gaussian classes, and the U-Net's class embedding."""

from __future__ import annotations

import pytest
import torch

from diffusion.nn import UNet
from diffusion.processes import schedules
from diffusion.processes.analytic import ClassGaussianOracle, GaussianOracle
from diffusion.processes.ddpm import GaussianDiffusion
from diffusion.processes.edm import EDM
from diffusion.processes.guidance import Guided
from diffusion.processes.prediction import Predictor
from diffusion.samplers import ddim, dpm_solver, heun

MEANS, S = [-0.5, 0.4], 0.3  # class c ~ N(MEANS[c], S²)
NULL_MEAN = 0.0  # the unconditional model ∅ ~ N(0, null_std²)
DDPM = GaussianDiffusion(schedules.linear(1000))


def oracle(process, null_std=S, target="eps") -> ClassGaussianOracle:
    return ClassGaussianOracle(process, MEANS, S, NULL_MEAN, null_std, target)


def test_w_0_is_the_conditional_network_bitwise_in_one_pass():
    net = oracle(DDPM)
    x, t, labels = torch.randn(6, 1, 2, 2), torch.full((6,), 500.0), torch.tensor([0, 1] * 3)
    assert torch.equal(Guided(net, labels, 0.0, null=2)(x, t), net(x, t, labels))
    assert net.calls == 2
    guided = Guided(net, labels, 1.0, null=2)(x, t)
    assert net.calls == 3  # both halves of a guided evaluation in one forward pass
    assert not torch.equal(guided, net(x, t, labels))  # the control
    # no labels: the unconditional model ∅
    assert torch.equal(Guided(net, None, 0.0, null=2)(x, t), net(x, t, torch.full((6,), 2)))


@pytest.mark.parametrize("target", ["eps", "x0", "v", "edm"])
@pytest.mark.parametrize("process", [DDPM, EDM()], ids=["ddpm", "edm"])
def test_guidance_of_any_target_is_the_eps_rule(target, process):
    """ε̃ = (1 + w) ε̂(x, c) - w ε̂(x, ∅), whichever target the network predicts."""
    w, labels = 2.0, torch.tensor([0, 1, 1, 0])
    x = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.tensor([10.0, 300.0, 700.0, 999.0] if process is DDPM else [0.01, 0.5, 5.0, 60.0],
                     dtype=torch.float64)  # fmt: skip
    guided = Predictor(Guided(oracle(process, 0.6, target), labels, w, null=2), process, target)
    data = {0: (MEANS[0], S), 1: (MEANS[1], S), "null": (NULL_MEAN, 0.6)}
    eps = {k: Predictor(GaussianOracle(process, *d), process)(x, t).eps_hat
           for k, d in data.items()}  # fmt: skip
    cond = torch.where(labels.reshape(-1, 1, 1, 1) == 0, eps[0], eps[1])
    expected = (1 + w) * cond - w * eps["null"]
    assert torch.allclose(guided(x, t).eps_hat, expected, rtol=1e-6, atol=1e-8)
    assert not torch.allclose(expected, cond, atol=1e-3)  # guidance changed something


@pytest.mark.parametrize(
    "sampler,options", [(ddim, {"steps": 100}), (dpm_solver, {"steps": 20}), (heun, {"steps": 50})]
)
def test_with_a_null_model_of_the_same_width_guidance_moves_the_mean_by_w_times_the_gap(
    sampler, options
):
    """Equal variances: ε̃ is the exact ε of N(μ_c + w (μ_c - μ_∅), s²), so every sampler gives
    the class's distribution at w = 0 and that shifted one at w > 0 (the std unchanged)."""
    labels = torch.arange(2000) % 2
    x_T = torch.randn(2000, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    out = {w: sampler(Predictor(Guided(oracle(DDPM), labels, w, null=2), DDPM), x_T, DDPM,
                      **options) for w in (0.0, 1.0, 3.0)}  # fmt: skip
    for c in (0, 1):
        mine = labels == c
        base = out[0.0][mine]
        assert float(base.mean()) == pytest.approx(MEANS[c], abs=0.02)
        assert float(base.std()) == pytest.approx(S, rel=0.06)
        for w in (1.0, 3.0):
            shifted = out[w][mine]
            gap = float(shifted.mean() - base.mean())
            assert gap == pytest.approx(w * (MEANS[c] - NULL_MEAN), abs=0.01)
            assert float(shifted.std()) == pytest.approx(float(base.std()), rel=0.01)


@pytest.mark.parametrize("process", [DDPM, EDM()], ids=["ddpm", "edm"])
def test_with_a_broader_null_model_guidance_sharpens_as_the_ode_predicts(process):
    """∅ ~ N(0, s_∅²), s_∅ > s. In σ̃ the guided ODE is linear, dx̃/dσ̃ = ε̃ with slope
    (1 + w) σ̃/(s² + σ̃²) - w σ̃/(s_∅² + σ̃²), so it maps std(x_T) to a std smaller by
    [s²/(s² + σ̃_max²)]^{w/2} [(s_∅² + σ̃_max²)/s_∅²]^{w/2} than at w = 0 (≈ (s/s_∅)^w). Heun at
    200 steps against that closed form; the control is w = 0."""
    null_std = 0.6
    labels = torch.arange(1000) % 2
    x_T = torch.randn(1000, 1, 1, 1, generator=torch.Generator().manual_seed(0)).double()
    top = float(process.sigma_tilde(torch.tensor([process.t_max], dtype=torch.float64)))
    std = {w: float(heun(Predictor(Guided(oracle(process, null_std), labels, w, null=2), process),
                         x_T, process, steps=200)[labels == 1].std())
           for w in (0.0, 1.0, 3.0)}  # fmt: skip
    for w in (1.0, 3.0):
        ratio = (S**2 / (S**2 + top**2) * (null_std**2 + top**2) / null_std**2) ** (w / 2)
        assert std[w] / std[0.0] == pytest.approx(ratio, rel=0.01)
    assert std[0.0] == pytest.approx(S, rel=0.06)


def test_a_learned_variance_keeps_the_conditional_variance():
    def net(inputs, label, y):
        mean = torch.where(y.reshape(-1, 1, 1, 1) == 2, 1.0, 3.0).expand_as(inputs)
        var = torch.where(y.reshape(-1, 1, 1, 1) == 2, -0.5, 0.5).expand_as(inputs)
        return torch.cat([mean, var], dim=1)

    out = Guided(net, torch.tensor([0, 1]), 2.0, null=2, mean_channels=1)(
        torch.zeros(2, 1, 2, 2), torch.zeros(2)
    )
    assert torch.equal(out[:, :1], torch.full((2, 1, 2, 2), 3 * 3.0 - 2 * 1.0))
    assert torch.equal(out[:, 1:], torch.full((2, 1, 2, 2), 0.5))  # the conditional half's


def test_guidance_needs_labels_and_a_non_negative_w():
    with pytest.raises(ValueError, match="guidance needs labels"):
        Guided(oracle(DDPM), None, 1.0, null=2)
    with pytest.raises(ValueError, match="guidance must be >= 0, got -1"):
        Guided(oracle(DDPM), torch.tensor([0]), -1.0, null=2)


def test_the_unet_adds_a_class_embedding_and_learns_a_null_class():
    torch.manual_seed(0)
    plain = UNet(8, 1, width=8, channel_mult=(1, 2), norm_groups=4)
    torch.manual_seed(0)
    conditional = UNet(8, 1, width=8, channel_mult=(1, 2), norm_groups=4, num_classes=3)
    # the unconditional network's weights are drawn as before; the embedding comes last
    weights = zip(plain.state_dict().items(), conditional.state_dict().values(), strict=False)
    for (name, p), q in weights:
        assert torch.equal(p, q), name
    assert conditional.class_emb.num_embeddings == 4  # three classes and ∅
    for p in conditional.parameters():  # the zero-initialised output would hide the labels
        torch.nn.init.normal_(p, std=0.2)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 5, 9])
    by_class = [conditional(x, t, torch.full((3,), c)) for c in range(4)]
    assert not torch.allclose(by_class[0], by_class[1])
    assert torch.equal(conditional(x, t), by_class[3])  # no labels: ∅
    with pytest.raises(ValueError, match="labels given to an unconditional network"):
        plain(x, t, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="model.num_classes=-1 must be an integer >= 0"):
        UNet(8, 1, width=8, channel_mult=(1, 2), norm_groups=4, num_classes=-1)

