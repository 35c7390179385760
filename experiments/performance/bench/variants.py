"""Each optimisation against what it replaced (memory format, AdamW, EMA, dropout, in-place
additions, attention layout, torch.compile, bf16), and the cost of the design itself."""

from __future__ import annotations

import statistics
import time
import types

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from diffusion.nn.unet import ResBlock
from experiments.performance.bench.measure import synchronize
from experiments.performance.bench.profiles import Profile
from experiments.performance.bench.training import (
    BareLoop,
    compose_train,
    interleaved,
    train_overrides,
)


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
        "loss through diffusion's Objective": {"objective": True},
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
