"""Sampling speed: seconds per batch of images for every sampler and NFE, and the time spent
outside the network."""

from __future__ import annotations

import time

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from diffusion.config import build
from diffusion.processes.prediction import Predictor
from diffusion.samplers import chain
from diffusion.samplers.spacing import timesteps
from experiments.performance.bench.measure import synchronize
from experiments.performance.bench.profiles import CHECKPOINT, Profile
from experiments.performance.bench.training import compose_train, train_overrides

SAMPLING = [  # (process, sampler, options reaching about n network evaluations)
    ("ddpm", "ddpm", lambda n: {"steps": n}),
    ("ddpm", "ddim", lambda n: {"steps": n}),
    ("ddpm", "dpm_solver", lambda n: {"steps": n}),
    ("ddpm", "euler_maruyama", lambda n: {"steps": n}),
    ("ve_sde", "predictor_corrector", lambda n: {"steps": max(1, n // 2)}),
    ("ncsn", "annealed_langevin", lambda n: {"steps_per_level": max(1, n // 10)}),
]


class NetworkClock:
    """Counts a network's calls and the time spent inside them (forward hooks)."""

    def __init__(self, net: nn.Module, device: torch.device) -> None:
        self.calls, self.seconds, self._start, self.device = 0, 0.0, 0.0, device
        net.register_forward_pre_hook(self._enter)
        net.register_forward_hook(self._exit)

    def _enter(self, *args) -> None:
        synchronize(self.device)
        self._start = time.perf_counter()

    def _exit(self, *args) -> None:
        synchronize(self.device)
        self.seconds += time.perf_counter() - self._start
        self.calls += 1


def sampling_module(process: str, device: torch.device):
    """The trained unet_small of experiments/fid_vs_nfe for the DDPM family (its samplers, and
    the SDE samplers through its VP-SDE view); an untrained one of the same size for VE and
    NCSN, whose samplers' cost does not depend on the weights."""
    from diffusion.checkpoints import load_module

    if process == "ddpm" and CHECKPOINT.exists():
        return load_module(CHECKPOINT, device)
    cfg = compose_train([f"process={process}", *train_overrides("unet_small", 1, device, 1)])
    return build(cfg.module, "module").to(device).eval()


def sampler_node(name: str, options: dict) -> dict:
    cfg = compose_train([f"sampler={name}"])
    return {**OmegaConf.to_container(cfg.sampler, resolve=True), **options}


def sampling(profile: Profile, device: torch.device) -> list[dict]:
    rows, modules, warmed = [], {}, set()
    n = profile.sample_batch

    def run(process: str, name: str, options: dict, target_nfe: int | str) -> None:
        if process not in modules:
            module = sampling_module(process, device)
            modules[process] = (module, NetworkClock(module.ema.module, device))
        module, clock = modules[process]
        node = sampler_node(name, options)
        if (process, name) not in warmed:  # imports (scipy) and first-call set-up, untimed
            module.sample(1, generator=torch.Generator().manual_seed(0), sampler=node)
            warmed.add((process, name))
        clock.calls, clock.seconds = 0, 0.0
        synchronize(device)
        start = time.perf_counter()
        module.sample(n, generator=torch.Generator().manual_seed(0), sampler=node)
        synchronize(device)
        total = time.perf_counter() - start
        rows.append({"sampler": name, "process": process, "target_nfe": target_nfe,
                     "nfe": clock.calls, "seconds": total, "network_seconds": clock.seconds,
                     "forward_ms": 1000 * clock.seconds / max(clock.calls, 1),
                     "overhead": total / clock.seconds - 1, "images": n})  # fmt: skip
        print(rows[-1], flush=True)

    for process, name, options in SAMPLING:
        for nfe in profile.nfe + ([1000] if name in profile.nfe_1000 else []):
            run(process, name, options(nfe), nfe)
    for rtol in profile.ode_rtol:
        run("ddpm", "probability_flow", {"rtol": rtol, "atol": rtol}, f"rtol {rtol:g}")
    # sampling's memory format against the contiguous one it replaced: DDIM, sampler alone
    module, _ = modules["ddpm"]
    net, steps = module.ema.module, profile.nfe[0]
    ddim = instantiate(sampler_node("ddim", {"steps": steps}))
    model = Predictor(net, module.process)
    for fmt_name, fmt in (
        ("contiguous", torch.contiguous_format),
        ("channels_last", torch.channels_last),
    ):
        net.eval().to(memory_format=fmt)
        x_T = torch.randn(n, *module.image_shape, device=device).contiguous(memory_format=fmt)
        synchronize(device)
        start = time.perf_counter()
        with torch.no_grad():
            ddim(model, x_T, module.process)
        synchronize(device)
        seconds = time.perf_counter() - start
        rows.append({"sampler": "ddim", "process": "ddpm", "target_nfe": f"{steps} ({fmt_name})",
                     "nfe": steps, "seconds": seconds, "images": n})  # fmt: skip
        print(rows[-1], flush=True)
    net.to(memory_format=module.memory_format)
    rows += design_cost(module, profile, device)
    return rows


# ----- the design's own cost: the samplers before the one-kernel view, and after -------------
def _gather(constant: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return constant.to(like.device)[t].to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


@torch.no_grad()
def previous_ddim(eps_net, x_T, process, steps: int) -> torch.Tensor:
    """DDIM (η = 0, uniform spacing) as the previous design wrote it: an ε-network called with
    integer t, ᾱ gathered from float32 buffers, no Predictor."""
    seq = timesteps(process.T, steps, "uniform")
    x = x_T
    for i, t in enumerate(seq):
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        eps = eps_net(x, tt)
        ab_t = _gather(process.alpha_bar, tt, x)
        x0 = (x - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()
        if i + 1 == len(seq):
            x = x0
            continue
        ab_s = _gather(process.alpha_bar, torch.full_like(tt, seq[i + 1]), x)
        x = ab_s.sqrt() * x0 + (1 - ab_s).sqrt() * eps
    return x


@torch.no_grad()
def previous_ancestral(eps_net, x_T, process, steps: int, generator) -> torch.Tensor:
    """The first ``steps`` steps of Algorithm 2 (σ² = β, clipped x̂_0) as the previous design
    wrote it: the same work per step as the respaced chain with as many steps."""
    x = x_T
    for t in list(reversed(range(process.T)))[:steps]:
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        eps = eps_net(x, tt)
        ab = _gather(process.alpha_bar, tt, x)
        x0 = ((x - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1, 1)
        mean = _gather(process.posterior_coef_x0, tt, x) * x0 + (
            _gather(process.posterior_coef_xt, tt, x) * x
        )
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        x = mean + _gather(process.beta, tt, x).sqrt() * noise if t > 0 else mean
    return x


def design_cost(module, profile: Profile, device: torch.device, rounds: int = 3) -> list[dict]:
    """The same network through the previous design's DDIM and ancestral loops and through
    today's samplers (kernel in float64, the Predictor's conversions), in interleaved rounds;
    the ratio is what the one-view design costs per sampled batch."""
    net = module.ema.module.eval().to(memory_format=torch.channels_last)
    n, steps = profile.sample_batch, profile.nfe[-1]
    x_T = torch.randn(n, *module.image_shape, generator=torch.Generator().manual_seed(0))
    x_T = x_T.to(device, memory_format=torch.channels_last)
    model, process = Predictor(net, module.process), module.process
    runs = {
        "ddim, previous design": lambda: previous_ddim(net, x_T, process, steps),
        "ddim": lambda: chain.ddim(model, x_T, process, steps=steps),
        "ddpm, previous design": lambda: previous_ancestral(
            net, x_T, process, steps, torch.Generator().manual_seed(1)),
        "ddpm": lambda: chain.ddpm_ancestral(
            model, x_T, process, steps=steps, generator=torch.Generator().manual_seed(1)),
    }  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():  # warm-up, untimed
        run()
    for _ in range(rounds):
        for name, run in runs.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    rows = []
    for name, seconds in times.items():
        best = min(seconds)
        rows.append({"sampler": name, "process": "ddpm", "target_nfe": steps, "nfe": steps,
                     "seconds": best, "images": n, "rounds": rounds})  # fmt: skip
        if not name.endswith("previous design"):
            before = min(times[f"{name}, previous design"])
            rows[-1]["vs_previous_design"] = best / before
        print(rows[-1], flush=True)
    return rows
