"""Training and sampling speed, against diffusers and lucidrains in the same run (`make bench`).

Training: images per second (median step after warm-up) of our U-Nets through the real
``Trainer.fit`` path (the project's config, data module and LightningModule) and through a bare
PyTorch loop with the same network, batch, L_simple, AdamW, gradient clipping and EMA; the same
bare loop with diffusers' ``UNet2DModel`` and lucidrains' ``Unet`` at matched size (peers.py).
FLOPs per step (``torch.utils.flop_counter``) give the achieved GFLOP/s, also as a fraction of
the machine's dense float32 matmul rate measured at the start. Peak memory a step adds: bytes
allocated through malloc on the CPU (glibc's mallinfo2, polled), ``max_memory_allocated`` on a
GPU.

Optimisations, each against its alternative in this run: memory format, AdamW implementation,
EMA update, dropout mask, in-place additions, attention layout, torch.compile, bf16 autocast.
The host allocator: glibc keeping freed memory (``keep_freed_memory``, on in diffusion.train
and so in this whole process, peers included) against glibc's default, a process each.
Sampling: seconds per 64 images per sampler and NFE, and the time outside the network as a
fraction of the time inside it.

    python experiments/performance/bench.py                 # the CPU profile (make bench)
    python experiments/performance/bench.py --profile full  # the whole protocol (~1 h on 2 cores)
    python experiments/performance/bench.py --profile smoke # seconds; what the tests run

Writes results.json and results.md next to this file (or to --out).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402

from diffusion.allocator import keep_freed_memory  # noqa: E402
from diffusion.config import build, build_loggers, check_config  # noqa: E402
from diffusion.ema import EMA  # noqa: E402
from diffusion.nn.unet import ResBlock  # noqa: E402

HERE = Path(__file__).parent
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
                     allocator=(("unet_small", 2),)),
}  # fmt: skip


# ----- measuring ---------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> float:
    synchronize(device)
    return time.perf_counter()


PHASES = ("data", "forward", "backward", "optimizer", "ema")  # of a bare-loop step


def _proc_status_mb(field: str) -> float | None:
    status = Path("/proc/self/status")
    lines = status.read_text().splitlines() if status.exists() else []
    values = [int(line.split()[1]) for line in lines if line.startswith(field + ":")]
    return values[0] / 1024 if values else None


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]  # fmt: skip


def malloc_in_use() -> Callable[[], int] | None:
    """Bytes glibc's malloc has handed out and not had back (mallinfo2: heap + mmapped blocks),
    whether or not freed memory is kept in the process; None without glibc >= 2.33."""
    try:
        mallinfo2 = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2

    def in_use() -> int:
        info = mallinfo2()
        return info.uordblks + info.hblkhd

    return in_use


class PeakMemory:
    """Memory a block adds at its peak above what was in use when it began, in MB (so the
    interpreter, torch and earlier runs' leftovers do not count): max_memory_allocated on a GPU;
    on the CPU the bytes malloc has handed out, polled every ``every_s`` by a thread (RSS would
    count freed memory the process keeps: keep_freed_memory); without glibc the RSS high-water
    mark (VmHWM, reset through /proc/self/clear_refs; Linux). The poll takes malloc's lock, so
    call :meth:`stop` before timing anything (leaving the block stops it too)."""

    def __init__(self, device: torch.device, every_s: float = 0.002) -> None:
        self.device, self.every_s, self.result, self.before = device, every_s, {}, None
        self.in_use = malloc_in_use() if device.type == "cpu" else None
        self.done, self.poller, self.peak = threading.Event(), None, 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            self.before = torch.cuda.memory_allocated(self.device) / 2**20
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.in_use is not None:
            self.before = self.in_use() / 2**20
            self.poller = threading.Thread(target=self._poll, daemon=True)
            self.poller.start()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self.before = _proc_status_mb("VmRSS")
            except OSError:
                pass
        return self

    def _poll(self) -> None:
        while not self.done.wait(self.every_s):
            self.peak = max(self.peak, self.in_use())

    def stop(self) -> None:
        if self.done.is_set() or self.before is None:
            return
        self.done.set()
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.poller is not None:
            self.poller.join()
            peak = max(self.peak, self.in_use()) / 2**20
        else:
            peak = _proc_status_mb("VmHWM")
        self.result["peak_mb"] = peak - self.before

    def __exit__(self, *exc) -> None:
        self.stop()


def matmul_gflops(device: torch.device, n: int = 2048, reps: int = 10) -> float:
    """The machine's dense float32 rate: median of ``reps`` n×n matmuls."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    times = []
    for _ in range(reps + 2):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times[2:]) / 1e9


def train_flops(net: nn.Module, batch: int, shape: tuple[int, int, int]) -> float:
    """FLOPs of one forward + backward at ``batch`` (counted at batch 2, linear in the batch)."""
    device = next(net.parameters()).device
    x = torch.randn(2, *shape, device=device)
    t = torch.randint(0, 1000, (2,), device=device)
    with FlopCounterMode(display=False) as counter:
        net(x, t).square().mean().backward()
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops() * batch / 2


def summary(times: list[float], batch: int) -> dict:
    median = statistics.median(times)
    return {"step_ms": 1000 * median, "images_per_s": batch / median, "steps_timed": len(times)}


# ----- training: bare loop -----------------------------------------------------------------
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
    ) -> None:
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.net = net.to(device, memory_format=self.fmt).train()
        self.ema = EMA(net, 0.9999)
        self.opt = instantiate(optimizer)(params=net.parameters())
        self.forward = torch.compile(net) if compiled else net
        self.alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, device=device), 0)
        self.images = torch.randint(0, 256, (1024, *shape), dtype=torch.uint8, device=device)
        self.batch, self.device, self.bf16, self.ema_impl = batch, device, bf16, ema_impl

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


# ----- training: the framework's Trainer.fit path ------------------------------------------
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


# ----- training: all paths ------------------------------------------------------------------
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


# ----- optimisations, each against its alternative -------------------------------------------
def attention_layouts(device: torch.device, batch: int, reps: int = 10) -> dict:
    """Forward + backward of scaled_dot_product_attention at unet_small's 14×14 level (1 head of
    64 channels): q, k, v strided along the channels (the old layout) vs unit-stride."""
    qkv = torch.randn(batch, 3, 1, 64, 196, device=device, requires_grad=True)

    def strided():
        return qkv.transpose(-1, -2).unbind(1)

    def unit_stride():
        return qkv.permute(1, 0, 2, 4, 3).contiguous().unbind(0)

    out = {}
    for name, layout in (("strided", strided), ("unit_stride", unit_stride)):
        times = []
        for _ in range(reps + 2):
            synchronize(device)
            start = time.perf_counter()
            F.scaled_dot_product_attention(*layout()).sum().backward()
            synchronize(device)
            times.append(time.perf_counter() - start)
        out[f"{name}_ms"] = 1000 * statistics.median(times[2:])
    return out


OP_GROUPS = {  # torch.profiler op names -> what they are
    "convolution": ("convolution",),
    "attention": ("attention", "bmm", "softmax"),
    "group norm": ("group_norm",),
    "dropout": ("bernoulli", "dropout", "uniform_", "random_"),  # random_: our lanes
}


def op_shares(net: nn.Module, batch: int, optimizer: dict, device: torch.device,
              channels_last: bool) -> dict:  # fmt: skip
    """Share of the operators' self time by kind, over 3 bare-loop steps under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    loop = BareLoop(net, batch, (1, 28, 28), optimizer, device=device, channels_last=channels_last)
    loop.step()
    with profile(activities=activities) as prof:
        loop.step(), loop.step()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    totals = {name: 0.0 for name in [*OP_GROUPS, "other"]}
    for event in prof.key_averages():
        key = event.key.lower()
        group = next((g for g, parts in OP_GROUPS.items() if any(p in key for p in parts)), "other")
        totals[group] += getattr(event, attr)
    everything = sum(totals.values())
    return {name: value / everything for name, value in totals.items()}


class RandLikeDropout(nn.Dropout):
    """Our dropout before the 16-bit lanes: one float32 uniform per element from rand_like."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = (torch.rand_like(x, dtype=torch.float32) >= self.p).to(x.dtype)
        return x * keep.mul_(1.0 / (1.0 - self.p))


def _res_out_of_place(block: ResBlock, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    h = block.in_layers(x) + block.emb_proj(emb)[:, :, None, None]
    return block.skip(x) + block.out_layers(h)


def earlier_blocks(net: nn.Module, dropout: str | None, out_of_place: bool) -> None:
    """Put back what an optimisation replaced: the dropout ("rand_like": ours before; "torch":
    nn.Dropout) or the additions and dropout that allocated a new tensor each."""
    for block in net.modules():
        if isinstance(block, ResBlock):
            p = block.out_layers[2].p
            if dropout is not None:
                block.out_layers[2] = (
                    RandLikeDropout(p) if dropout == "rand_like" else nn.Dropout(p)
                )
            if out_of_place:
                block.out_layers[2].inplace = False
                block.forward = types.MethodType(_res_out_of_place, block)


def variants(profile: Profile, device: torch.device) -> list[dict]:
    """unet_small at the first batch size, bare loop: the default and one change at a time."""
    batch = profile.models["unet_small"][0]
    cfg = compose_train(train_overrides("unet_small", batch, device, 1))
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    optimizer = OmegaConf.to_container(cfg.optimizer, resolve=True)
    default_cl = bool(cfg.module.channels_last)
    shape = (1, 28, 28)
    cases = {
        "default": {},
        "channels_last" if not default_cl else "contiguous": {"channels_last": not default_cl},
        "AdamW foreach": {"optimizer": {**optimizer, "foreach": True, "fused": None}},
        "AdamW fused": {"optimizer": {**optimizer, "fused": True, "foreach": None}},
        "AdamW for-loop": {"optimizer": {**optimizer, "foreach": False, "fused": None}},
        "EMA Python loop": {"ema_impl": "loop"},
        "dropout from rand_like": {"dropout": "rand_like"},
        "nn.Dropout": {"dropout": "torch"},
        "adds out of place": {"out_of_place": True},
        "bf16 autocast": {"bf16": True},
        "torch.compile": {"compiled": True},
    }
    if not profile.compile:
        del cases["torch.compile"]
    loops = {}
    for name, change in cases.items():
        kwargs = {"channels_last": default_cl, "optimizer": optimizer, **change}
        torch.manual_seed(0)
        net = instantiate(model_cfg)
        earlier_blocks(net, kwargs.pop("dropout", None), kwargs.pop("out_of_place", False))
        loops[name] = BareLoop(net, batch, shape, kwargs.pop("optimizer"), device=device, **kwargs)
    # compilation and recompilation take the first few steps
    measured = interleaved(loops, profile.warmup + 3, profile.steps, device)
    rows = [{"variant": name, "batch": batch, **out} for name, out in measured.items()]
    print(rows, flush=True)
    rows.append({"variant": "attention", "batch": batch, **attention_layouts(device, batch)})
    rows.append({"variant": "op shares", "batch": batch, **op_shares(
        instantiate(model_cfg), batch, optimizer, device, default_cl)})  # fmt: skip
    print(rows[-2:], flush=True)
    return rows


# ----- the host allocator --------------------------------------------------------------------
def allocator_probe(model: str, batch: int, warmup: int, steps: int, keep: bool) -> dict:
    """Our bare loop in this (fresh) process, with glibc keeping freed memory or not: median
    step, minor page faults per step and the resident memory at the end."""
    import resource

    applied = keep_freed_memory() if keep else False
    device = torch.device("cpu")
    cfg = compose_train(train_overrides(model, batch, device, 1))
    channels, size = SHAPES[model]
    loop = BareLoop(instantiate(OmegaConf.to_container(cfg.model, resolve=True)), batch,
                    (channels, size, size), OmegaConf.to_container(cfg.optimizer, resolve=True),
                    device=device, channels_last=bool(cfg.module.channels_last))  # fmt: skip
    for _ in range(warmup):
        loop.step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = [sum(loop.step().values()) for _ in range(steps)]
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return {"model": model, "batch": batch, "keep_freed_memory": applied,
            **summary(times, batch), "page_faults_per_step": faults / steps,
            "rss_mb": _proc_status_mb("VmRSS")}  # fmt: skip


def allocator(profile: Profile) -> list[dict]:
    """keep_freed_memory on and off, each in a process of its own (it cannot be undone inside
    one), alternating twice so that drift of a shared machine falls on both."""
    rows = []
    for model, batch in profile.allocator:
        base = model == "unet_base"
        warmup = profile.base_warmup if base else profile.warmup
        steps = profile.base_steps if base else profile.steps
        runs: dict[bool, list[dict]] = {True: [], False: []}
        for keep in (True, False) * (1 if base else 2):
            command = [sys.executable, __file__, "--allocator-probe", model, str(batch),
                       str(warmup), str(steps), "keep" if keep else "default"]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            runs[keep].append(json.loads(done.stdout.strip().splitlines()[-1]))
        for keep, probes in runs.items():
            best = min(probes, key=lambda r: r["step_ms"])  # the run least disturbed
            rows.append({**best, "runs": len(probes), "keep": keep})
            print(rows[-1], flush=True)
    return rows


# ----- sampling ------------------------------------------------------------------------------
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
    for fmt_name, fmt in (
        ("contiguous", torch.contiguous_format),
        ("channels_last", torch.channels_last),
    ):
        net.eval().to(memory_format=fmt)
        x_T = torch.randn(n, *module.image_shape, device=device).contiguous(memory_format=fmt)
        synchronize(device)
        start = time.perf_counter()
        with torch.no_grad():
            ddim(net, x_T, module.process)
        synchronize(device)
        seconds = time.perf_counter() - start
        rows.append({"sampler": "ddim", "process": "ddpm", "target_nfe": f"{steps} ({fmt_name})",
                     "nfe": steps, "seconds": seconds, "images": n})  # fmt: skip
        print(rows[-1], flush=True)
    net.to(memory_format=module.memory_format)
    return rows


# ----- report ---------------------------------------------------------------------------------
def machine(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                 if ln.startswith("model name")]  # fmt: skip
        cpu = names[0] if names else cpu
    info = {"cpu": cpu, "logical_cpus": torch.multiprocessing.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "device": str(device)}  # fmt: skip
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['torch_threads']} torch "
        f"threads, torch {m['torch']}, device {m['device']} {m.get('gpu', '')}, freed host "
        f"memory {'kept' if m.get('keep_freed_memory') else 'returned'} (glibc). "
        f"Profile `{results['profile']}`, {results['date']}, {results['seconds']:.0f} s in all. "
        f"Dense float32 matmul (2048²): {results['matmul_gflops']:.0f} GFLOP/s.",
        "",
        "### Training (median step after warm-up)",
        "",
        "| model | batch | network | path | params (M) | steps timed | ms / step | images / s "
        "| vs ours bare | GFLOP / step | GFLOP/s | of matmul rate | peak MB of a step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = results["training"]
    for r in rows:
        ours = next(o for o in rows if o["model"] == r["model"] and o["batch"] == r["batch"]
                    and o["network"] == "ours" and o["path"] == "bare loop")  # fmt: skip
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['network']} | {r['path']} | "
            f"{r['parameters'] / 1e6:.2f} | {r['steps_timed']} | {r['step_ms']:.0f} | "
            f"{r['images_per_s']:.1f} | {r['images_per_s'] / ours['images_per_s']:.3f} | "
            f"{r['gflop_per_step']:.0f} | {r['gflops']:.0f} | {r['of_matmul_rate']:.0%} | "
            f"{r.get('peak_mb', float('nan')):.0f} |"
        )
    lines += ["", "Phases of a bare-loop step (median ms):", "",
              "| model | batch | network | data | forward | backward | clip + AdamW | EMA "
              "| EMA share |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if r["path"] == "bare loop":
            phases = " | ".join(f"{r[f'{p}_ms']:.1f}" for p in PHASES)
            lines.append(f"| {r['model']} | {r['batch']} | {r['network']} | {phases} | "
                         f"{r['ema_fraction']:.2%} |")  # fmt: skip
    if results.get("variants"):
        lines += ["", "### Optimisations: unet_small, bare loop, one change at a time", "",
                  "| variant | ms / step | vs default | EMA ms |", "|---|---|---|---|"]  # fmt: skip
        default = results["variants"][0]["step_ms"]
        for r in results["variants"]:
            if r["variant"] in ("attention", "op shares"):
                continue
            slow_start = r["first_step_s"] > 5 * r["step_ms"] / 1000
            extra = f" (first step {r['first_step_s']:.0f} s)" if slow_start else ""
            lines.append(f"| {r['variant']}{extra} | {r['step_ms']:.0f} | "
                         f"{r['step_ms'] / default:.3f} | {r['ema_ms']:.2f} |")  # fmt: skip
        att = next(r for r in results["variants"] if r["variant"] == "attention")
        shares = next(r for r in results["variants"] if r["variant"] == "op shares")
        lines += ["", f"Attention at 14×14, batch {att['batch']}, forward + backward: q, k, v "
                  f"strided {att['strided_ms']:.1f} ms, unit stride {att['unit_stride_ms']:.1f} ms "
                  f"({att['strided_ms'] / att['unit_stride_ms']:.2f}x).", ""]  # fmt: skip
        kinds = [f"{k} {v:.0%}" for k, v in shares.items() if k not in ("variant", "batch")]
        lines.append("Operator self time by kind (torch.profiler, default): " + ", ".join(kinds))
    if results.get("allocator"):
        lines += ["", "### Host allocator: glibc keeping freed memory (keep_freed_memory), our "
                  "bare loop, a process each", "",
                  "| model | batch | freed memory | ms / step | vs kept | page faults / step "
                  "| RSS MB |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in results["allocator"]:
            kept = next(k for k in results["allocator"] if k["model"] == r["model"]
                        and k["batch"] == r["batch"] and k["keep"])  # fmt: skip
            lines.append(f"| {r['model']} | {r['batch']} | "
                         f"{'kept' if r['keep'] else 'returned (glibc default)'} | "
                         f"{r['step_ms']:.0f} | {r['step_ms'] / kept['step_ms']:.3f} | "
                         f"{r['page_faults_per_step']:.0f} | {r['rss_mb']:.0f} |")  # fmt: skip
    if results.get("sampling"):
        lines += sampling_markdown(results["sampling"])
    return "\n".join(lines) + "\n"


def sampling_markdown(rows: list[dict]) -> list[str]:
    lines = ["", f"### Sampling ({rows[0]['images']} images, unet_small 28×28)", "",
              "| sampler | process | target NFE | NFE | seconds | ms / forward | overhead beyond "
              "the network |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        overhead = f"{r['overhead']:.1%}" if "overhead" in r else "-"
        forward = f"{r['forward_ms']:.1f}" if "forward_ms" in r else "-"
        lines.append(f"| {r['sampler']} | {r['process']} | {r['target_nfe']} | {r['nfe']} | "
                     f"{r['seconds']:.1f} | {forward} | {overhead} |")  # fmt: skip
    return lines


SECTIONS = ["training", "variants", "allocator", "sampling"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--only", nargs="*", choices=SECTIONS)
    parser.add_argument("--allocator-probe", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.allocator_probe:  # a child of allocator(): MODEL BATCH WARMUP STEPS keep|default
        model, batch, warmup, steps, mode = args.allocator_probe
        print(json.dumps(allocator_probe(model, int(batch), int(warmup), int(steps),
                                         mode == "keep")))  # fmt: skip
        return
    profile, device = PROFILES[args.profile], torch.device(args.device)
    sections = set(args.only or SECTIONS)
    start = time.perf_counter()
    # as diffusion.train does by default on the CPU; every path and peer in this process alike
    kept = keep_freed_memory() if device.type == "cpu" else False
    results: dict = {
        "profile": args.profile, "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {**machine(device), "keep_freed_memory": kept},
        "matmul_gflops": matmul_gflops(device),
    }  # fmt: skip
    print(results, flush=True)
    # first, while this process is small: it keeps the freed memory of every network it runs
    # (20 GB after unet_base at batch 128), and the probes' processes need room beside it
    cpu = device.type == "cpu"
    results["allocator"] = allocator(profile) if "allocator" in sections and cpu else []
    results["training"] = (
        training(profile, device, results["matmul_gflops"]) if "training" in sections else []
    )
    results["variants"] = (
        variants(profile, device) if "variants" in sections and profile.variants else []
    )
    results["sampling"] = sampling(profile, device) if "sampling" in sections else []
    results["seconds"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
