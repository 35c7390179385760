"""Training speed: a bare PyTorch loop with our network and the peers' (peers.py), and the
framework's own ``Trainer.fit`` path, at the profile's models and batch sizes."""

from __future__ import annotations

import importlib.util
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf
from torch import nn

from diffusion.config import build, build_loggers, check_config
from diffusion.processes.ddpm import GaussianDiffusion
from diffusion.processes.schedules import linear
from diffusion.training.ema import EMA
from diffusion.training.objective import Objective
from experiments.performance.bench import peers
from experiments.performance.bench.measure import (
    PHASES,
    PeakMemory,
    clock,
    summary,
    synchronize,
    train_flops,
)
from experiments.performance.bench.profiles import SHAPES, Profile


class BareLoop:
    """DDPM's Algorithm 1 in plain PyTorch: x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε, ‖ε - ε_θ(x_t, t)‖²,
    AdamW, gradient norm clipped to 1, EMA update; data are uint8 images scaled per batch.
    :meth:`step` runs one step and returns the seconds of each of :data:`PHASES`."""

    def __init__(
        self,
        net: nn.Module,
        batch: int,
        shape: tuple[int, int, int],
        optimizer: dict,
        *,
        device: torch.device,
        channels_last: bool,
        bf16: bool = False,
        ema_impl: str = "foreach",
        compiled: bool = False,
        objective: bool = False,
    ) -> None:
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.net = net.to(device, memory_format=self.fmt).train()
        self.ema = EMA(net, 0.9999)
        self.opt = instantiate(optimizer)(params=net.parameters())
        self.forward = torch.compile(net) if compiled else net
        self.alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, device=device), 0)
        self.images = torch.randint(0, 256, (1024, *shape), dtype=torch.uint8, device=device)
        self.batch, self.device, self.bf16, self.ema_impl = batch, device, bf16, ema_impl
        # the framework's loss (diffusion.training.objective) in place of the inline one
        process = GaussianDiffusion(linear(1000)).to(device)
        self.objective = Objective(process) if objective else None

    def step(self) -> dict[str, float]:
        device, batch = self.device, self.batch
        stamps = [clock(device)]
        index = torch.randint(0, self.images.shape[0], (batch,), device=device)
        x0 = (self.images[index].float() / 127.5 - 1).contiguous(memory_format=self.fmt)
        t = torch.randint(0, 1000, (batch,), device=device)
        eps = torch.randn_like(x0)
        ab = self.alpha_bar[t].view(-1, 1, 1, 1)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
        stamps.append(clock(device))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
            if self.objective is not None:
                loss = self.objective(self.forward, x0, t, eps).mean()
            else:
                loss = F.mse_loss(self.forward(x_t, t).float(), eps)
        stamps.append(clock(device))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        stamps.append(clock(device))
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        self.opt.step()
        stamps.append(clock(device))
        if self.ema_impl == "foreach":
            self.ema.update(self.net)
        else:  # the per-parameter Python loop the foreach update replaced
            with torch.no_grad():
                decay = self.ema.current_decay()
                for e, p in zip(self.ema.module.parameters(), self.net.parameters(), strict=True):
                    e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        stamps.append(clock(device))
        return {name: b - a for name, a, b in zip(PHASES, stamps[:-1], stamps[1:], strict=True)}


def interleaved(loops: dict[str, BareLoop], warmup: int, steps: int, device) -> dict[str, dict]:
    """Warm each loop up alone (its peak memory measured then), then time them in rounds of one
    step each, so that a slow spell of a shared machine falls on all of them alike."""
    phases: dict[str, list[dict]] = {name: [] for name in loops}
    out: dict[str, dict] = {}
    for name, loop in loops.items():
        with PeakMemory(device) as mem:
            first = [loop.step() for _ in range(warmup)]
        out[name] = {**mem.result, "first_step_s": sum(first[0].values())}
    for _ in range(steps):
        for name, loop in loops.items():
            phases[name].append(loop.step())
    for name, times in phases.items():
        row = summary([sum(p.values()) for p in times], loops[name].batch)
        for phase in PHASES:
            row[f"{phase}_ms"] = 1000 * statistics.median(p[phase] for p in times)
        row["ema_fraction"] = row["ema_ms"] / row["step_ms"]
        out[name] = {**row, **out[name]}
    return out


# ----- the framework's Trainer.fit path --------------------------------------------------
def compose_train(overrides: list[str]):
    with initialize_config_module("diffusion.conf", version_base="1.3"):
        return compose("train", overrides=overrides)


def train_overrides(model: str, batch: int, device: torch.device, max_steps: int) -> list[str]:
    channels, size = SHAPES[model]
    return [
        f"model={model}", "data=digits", f"data.image_size={size}", f"data.channels={channels}",
        f"data.batch_size={batch}", f"trainer.max_steps={max_steps}",
        f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}",
        "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "callbacks.progress_bar=null",
        "callbacks.sample_grid=null", "callbacks.schedule_plot=null", "callbacks.fid=null",
        "callbacks.checkpoint=null",
    ]  # fmt: skip


class StepTimer(Callback):
    """Stamps the end of every step; calls ``after_warmup`` once ``warmup`` steps are done."""

    def __init__(self, device: torch.device, warmup: int, after_warmup: Callable) -> None:
        self.device, self.stamps, self.warmup, self.after_warmup = device, [], warmup, after_warmup

    def on_train_batch_end(self, *args) -> None:
        synchronize(self.device)
        self.stamps.append(time.perf_counter())
        if len(self.stamps) == self.warmup:
            self.after_warmup()  # before the next stamp: untimed


def lightning_loop(
    model: str, batch: int, *, device: torch.device, warmup: int, steps: int, extra: list[str]
) -> dict:
    """Steady-state steps of ``Trainer.fit`` on the project's config (digits data at the model's
    size; logger, LR monitor and preemption handler on; no validation, checkpoints or grids)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_train(
            [*train_overrides(model, batch, device, warmup + steps + 1), *extra,
             f"paths.output_dir={tmp}"]
        )  # fmt: skip
        check_config(cfg)
        datamodule = build(cfg.data, "data")
        module = build(cfg.module, "module")
        memory = PeakMemory(device)  # over the warm-up steps, as for the bare loops
        timer = StepTimer(device, warmup, after_warmup=memory.stop)
        callbacks = [build(n, f"callbacks.{k}") for k, n in cfg.callbacks.items() if n]
        trainer = build(
            cfg.trainer, "trainer", callbacks=[*callbacks, timer], logger=build_loggers(cfg.logger)
        )
        with memory:
            trainer.fit(module, datamodule=datamodule)
    gaps = [b - a for a, b in zip(timer.stamps[:-1], timer.stamps[1:], strict=True)]
    return {**summary(gaps[-steps:], batch), **memory.result}


# ----- all paths ----------------------------------------------------------------------------
def networks(model_cfg: dict, required: bool) -> dict[str, Callable[[], nn.Module]]:
    ours = lambda: instantiate(model_cfg)  # noqa: E731
    nets = {"ours": ours}
    target = peers.parameter_count(ours())
    for name, package, make in (
        ("diffusers", "diffusers", lambda: peers.diffusers_unet(model_cfg)),
        ("lucidrains", "denoising_diffusion_pytorch",
         lambda: peers.lucidrains_unet(model_cfg, target)),
    ):  # fmt: skip
        if importlib.util.find_spec(package) is None:  # checked without building a network
            if required:
                raise SystemExit(
                    f"{package} is not installed: the peers are optional benchmark "
                    "dependencies; pip install -e '.[bench]' (or run with --profile smoke)"
                )
            continue
        nets[name] = make
    return nets


def training(profile: Profile, device: torch.device, matmul: float) -> list[dict]:
    rows = []
    for model, batches in profile.models.items():
        base = model == "unet_base"
        warmup = profile.base_warmup if base else profile.warmup
        steps = profile.base_steps if base else profile.steps
        channels, size = SHAPES[model]
        shape = (channels, size, size)
        cfg = compose_train(train_overrides(model, batches[0], device, 1))
        model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
        optimizer = OmegaConf.to_container(cfg.optimizer, resolve=True)
        channels_last = bool(cfg.module.channels_last)
        nets = networks(model_cfg, profile.peers_required)
        for batch in batches:
            built = {name: make() for name, make in nets.items()}
            loops = {
                name: BareLoop(net, batch, shape, optimizer, device=device,
                               channels_last=channels_last and name == "ours")
                for name, net in built.items()
            }  # fmt: skip
            for name, out in interleaved(loops, warmup, steps, device).items():
                rows.append({
                    "model": model, "batch": batch, "network": name, "path": "bare loop",
                    "parameters": peers.parameter_count(built[name]),
                    "gflop_per_step": train_flops(built[name], batch, shape) / 1e9, **out,
                })  # fmt: skip
                print(rows[-1], flush=True)
            del built, loops
            out = lightning_loop(model, batch, device=device, warmup=warmup, steps=steps, extra=[])
            ours = rows[-len(nets)]
            rows.append({
                "model": model, "batch": batch, "network": "ours", "path": "Trainer.fit",
                "parameters": ours["parameters"], "gflop_per_step": ours["gflop_per_step"],
                **out,
            })  # fmt: skip
            print(rows[-1], flush=True)
    for row in rows:
        row["gflops"] = row["gflop_per_step"] / (row["step_ms"] / 1000)
        row["of_matmul_rate"] = row["gflops"] / matmul
    return rows
