"""FID, KID and IS code paths with a small injected feature extractor (no downloads)."""

import pytest
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from diffusion.evaluation import metrics as M


class SmallFeatures(nn.Module):
    """A fixed random conv net: uint8 (N, 3, H, W) -> (N, 16). ``weights_path`` is ignored (it
    stands in for InceptionFeatures in configs)."""

    def __init__(self, weights_path: str | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.float() / 255).mean((2, 3))


NET = SmallFeatures()


def features(images: torch.Tensor) -> torch.Tensor:
    return M.extract(lambda x: {"pool": NET(x)}, images)["pool"]


def images(shift: int = 0, n: int = 300, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 200, (n, 1, 16, 16), generator=g)
    return (x + shift).clamp(0, 255).to(torch.uint8)


def test_fid_is_zero_for_identical_sets_and_grows_with_a_shift():
    base = features(images())
    assert abs(M.frechet_distance(base, base)) < 1e-8
    fids = [M.frechet_distance(base, features(images(shift))) for shift in (10, 30, 60)]
    assert 0 < fids[0] < fids[1] < fids[2]


def test_fid_matches_torchmetrics_on_the_same_features():
    a, b = images(), images(40, seed=1)
    fid = FrechetInceptionDistance(feature=NET)
    fid.update(a.expand(-1, 3, -1, -1), real=True)
    fid.update(b.expand(-1, 3, -1, -1), real=False)
    assert M.frechet_distance(features(a), features(b)) == pytest.approx(
        float(fid.compute()), rel=1e-4
    )


def test_kid_is_unbiased_near_zero_for_the_same_distribution_and_grows_with_a_shift():
    a, b = features(images(seed=0)), features(images(seed=1))
    same, _ = M.kernel_inception_distance(a, b, subsets=20, subset_size=200)
    shifted, _ = M.kernel_inception_distance(
        a, features(images(40, seed=1)), subsets=20, subset_size=200
    )
    far, _ = M.kernel_inception_distance(
        a, features(images(80, seed=1)), subsets=20, subset_size=200
    )
    assert abs(same) < 0.1 * shifted and 0 < shifted < far


def test_kid_on_whole_sets_is_the_mmd_formula():
    x, y = torch.randn(50, 4, dtype=torch.float64), torch.randn(40, 4, dtype=torch.float64) + 0.5
    m = 40
    mean, _ = M.kernel_inception_distance(x[:m], y, subsets=1, subset_size=m)
    k = lambda a, b: (a @ b.T / 4 + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x[:m], x[:m]), k(y, y), k(x[:m], y)
    expected = (kxx.sum() - kxx.trace() + kyy.sum() - kyy.trace()) / (m * (m - 1)) - 2 * kxy.mean()
    assert mean == pytest.approx(float(expected), rel=1e-10)


def test_inception_score_limits():
    uniform = torch.zeros(100, 10)
    assert M.inception_score(uniform, splits=2)[0] == pytest.approx(1.0)
    confident = torch.full((100, 10), -50.0)
    confident[torch.arange(100), torch.arange(100) % 10] = 50.0
    assert M.inception_score(confident, splits=2)[0] == pytest.approx(10.0, rel=1e-6)


def test_reference_features_are_cached_and_a_corrupt_cache_is_recomputed(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return torch.ones(3, 2)

    a = M.cached_reference_features("mnist/train/28", compute, tmp_path)
    b = M.cached_reference_features("mnist/train/28", compute, tmp_path)
    assert torch.equal(a, b) and len(calls) == 1
    M.cached_reference_features("mnist/train/32", compute, tmp_path)
    assert len(calls) == 2
    for f in tmp_path.glob("ref_*.pt"):
        f.write_bytes(b"garbage")
    M.cached_reference_features("mnist/train/28", compute, tmp_path)
    assert len(calls) == 3


def test_missing_inception_weights_is_a_clear_error(tmp_path):
    from diffusion.errors import UserError

    with pytest.raises(UserError, match="not found"):
        M.InceptionFeatures(str(tmp_path / "missing.pth"))
