"""Closed-form checks of the β schedules (diffusion.processes.schedules)."""

import math

import pytest
import torch

from diffusion.processes import schedules
from diffusion.processes.schedules import validate_beta

ALL = [schedules.linear, schedules.quadratic, schedules.sigmoid, schedules.cosine]


def test_linear_T1000_end_points_and_alpha_bar_T():
    beta = schedules.linear(1000)
    assert beta.dtype == torch.float64 and beta.shape == (1000,)
    assert beta[0].item() == pytest.approx(1e-4) and beta[-1].item() == pytest.approx(0.02)
    alpha_bar_T = torch.prod(1 - beta).item()
    assert alpha_bar_T == pytest.approx(4.036e-5, rel=1e-3)


def test_linear_scales_end_points_by_1000_over_T():
    beta = schedules.linear(250)
    assert beta[0].item() == pytest.approx(4e-4) and beta[-1].item() == pytest.approx(0.08)


def test_cosine_clips_only_the_last_beta_at_T1000():
    beta = schedules.cosine(1000)
    clipped = (beta >= 0.999).nonzero().flatten().tolist()
    assert clipped == [999]
    # before the clip, ᾱ follows f(t)/f(0) exactly
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    alpha_bar = torch.cumprod(1 - beta, 0)
    for t in (0, 1, 500, 998):  # code index t is the paper's t + 1
        assert alpha_bar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)


def test_quadratic_is_linear_in_sqrt_beta():
    beta = schedules.quadratic(1000)
    steps = torch.diff(beta.sqrt())
    assert torch.allclose(steps, steps[0].expand_as(steps), rtol=1e-9)
    assert beta[0].item() == pytest.approx(1e-4) and beta[-1].item() == pytest.approx(0.02)


def test_sigmoid_matches_its_formula():
    beta = schedules.sigmoid(1001)  # odd T puts u = 0 at the middle index
    scale = 1000 / 1001
    start, end = 1e-4 * scale, 0.02 * scale
    assert beta[500].item() == pytest.approx((start + end) / 2, rel=1e-12)
    sig = 1 / (1 + math.exp(6))
    assert beta[0].item() == pytest.approx(start + (end - start) * sig, rel=1e-12)
    assert torch.all(torch.diff(beta) > 0)


@pytest.mark.parametrize("schedule", ALL, ids=lambda f: f.__name__)
@pytest.mark.parametrize("T", [1, 2, 7, 20, 21, 100, 1000, 4000])
def test_every_schedule_is_valid_for_any_T(schedule, T):
    beta = validate_beta(schedule(T))
    assert beta.shape == (T,)
    alpha_bar = torch.cumprod(1 - beta, 0)
    assert torch.all(torch.diff(alpha_bar) < 0)


@pytest.mark.parametrize("T", [0, -3, 2.5])
def test_bad_T_is_rejected(T):
    with pytest.raises(ValueError, match="T must be an integer >= 1"):
        schedules.linear(T)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_validate_beta_names_the_bad_value(bad):
    beta = torch.full((5,), 0.01, dtype=torch.float64)
    beta[3] = bad
    with pytest.raises(ValueError, match=rf"beta\[3\] = {bad}"):
        validate_beta(beta)
