"""What one benchmark run measures: the ``quick`` profile of ``make bench``, the ``full``
protocol, and the ``smoke`` profile the tests run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent  # experiments/performance: results go here
ROOT = HERE.parents[1]  # the repository
CHECKPOINT = HERE.parent / "fid_vs_nfe" / "checkpoint.ckpt"  # a trained unet_small (28x28)
SHAPES = {"unet_small": (1, 28), "unet_base": (3, 32)}  # (channels, image size)


@dataclass
class Profile:
    """What one run measures. ``base_*``: unet_base, which costs ~15 s a step on 2 CPU cores."""

    models: dict[str, list[int]]  # model -> batch sizes
    warmup: int
    steps: int
    base_warmup: int
    base_steps: int
    nfe: list[int]
    nfe_1000: list[str]  # samplers also run at NFE 1000
    ode_rtol: list[float]
    variants: bool = True
    compile: bool = True  # the torch.compile variant (its compilation takes minutes on a CPU)
    sample_batch: int = 64
    peers_required: bool = True
    allocator: tuple[tuple[str, int], ...] = (("unet_small", 64),)  # (model, batch), CPU only
    allocator_rounds: int = 2  # on/off pairs of processes (unet_small; unet_base: one)


PROFILES = {
    # fits `make bench` in 15 minutes on 2 CPU cores
    "quick": Profile({"unet_small": [64, 128], "unet_base": [64]}, 3, 20, 1, 3,
                     [20, 50], ["ddpm"], [1e-3]),
    "full": Profile({"unet_small": [64, 128], "unet_base": [64, 128]}, 3, 20, 3, 20,
                    [20, 50], ["ddpm", "ddim", "dpm_solver", "euler_maruyama",
                               "predictor_corrector", "annealed_langevin"], [1e-3, 1e-5],
                    allocator=(("unet_small", 64), ("unet_base", 64))),
    "smoke": Profile({"unet_small": [2]}, 1, 2, 1, 1, [2], [], [1e-1],
                     sample_batch=2, peers_required=False, compile=False,
                     allocator=(("unet_small", 2),), allocator_rounds=1),
}  # fmt: skip
