"""Spacings of the chain samplers (diffusion.samplers.spacing)."""

import pytest
import torch

from diffusion.processes import schedules
from diffusion.samplers.spacing import SPACINGS, timesteps

ALPHA_BAR = torch.cumprod(1 - schedules.linear(1000), 0)
LOG_SNR = 0.5 * (ALPHA_BAR.log() - (-ALPHA_BAR).log1p())  # λ = log(m / σ) at each index


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [1, 2, 10, 20, 50, 100, 999, 1000])
def test_distinct_decreasing_indices_within_range(spacing, steps):
    ts = timesteps(1000, steps, spacing, LOG_SNR)
    assert len(ts) == steps == len(set(ts))
    assert ts == sorted(ts, reverse=True)
    assert 0 <= ts[-1] and ts[0] <= 999


def test_the_ends_of_each_spacing():
    assert timesteps(1000, 10, "uniform") == list(range(900, -1, -100))
    assert timesteps(1000, 10, "trailing") == list(range(999, 0, -100))
    assert timesteps(1000, 10, "quadratic")[0] == 800 and timesteps(1000, 10, "quadratic")[-1] == 0
    ts = timesteps(1000, 10, "logsnr", LOG_SNR)
    assert ts[0] == 999 and ts[-1] == 0
    assert timesteps(1000, 1000, "uniform") == list(range(999, -1, -1))


def test_karras_spacing_is_eq_5_in_sigma_tilde_rounded_to_the_chain():
    """σ̃ = e^{-λ} at the visited indices follows Karras' steps between the chain's ends (ρ = 7):
    evenly spaced in σ̃^{1/7}, away from the dense end near the data where indices round."""
    ts = timesteps(1000, 12, "karras", LOG_SNR)
    assert ts[0] == 999 and ts[-1] == 0
    root = torch.exp(-LOG_SNR[ts]) ** (1 / 7)
    gaps = torch.diff(root)
    assert torch.allclose(gaps[:-3], gaps[:-3].mean().expand_as(gaps[:-3]), rtol=0.05)
    logsnr_gaps = torch.diff(torch.exp(-LOG_SNR[timesteps(1000, 12, "logsnr", LOG_SNR)]) ** (1 / 7))
    assert not torch.allclose(logsnr_gaps[:-3], logsnr_gaps[:-3].mean().expand(8), rtol=0.05)


def test_logsnr_spacing_is_uniform_in_log_snr():
    ts = timesteps(1000, 20, "logsnr", LOG_SNR)
    gaps = torch.diff(LOG_SNR[ts])
    # away from t = 0, where one index spans more than a gap, the gaps are equal within rounding
    assert torch.allclose(gaps[:-3], gaps[:-3].mean().expand_as(gaps[:-3]), rtol=0.15)


@pytest.mark.parametrize(
    "steps,spacing,match",
    [(0, "uniform", "steps"), (1001, "uniform", "steps"), (10, "leading", "spacing")],
)
def test_bad_arguments(steps, spacing, match):
    with pytest.raises(ValueError, match=match):
        timesteps(1000, steps, spacing, LOG_SNR)
