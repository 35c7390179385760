"""The host allocator: glibc keeping freed memory (``keep_freed_memory``) against its default,
each in a process of its own."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffusion.allocator import keep_freed_memory
from experiments.performance.bench.measure import _proc_status_mb, summary
from experiments.performance.bench.profiles import ROOT, SHAPES, Profile
from experiments.performance.bench.training import BareLoop, compose_train, train_overrides


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
        for keep in (True, False) * (1 if base else profile.allocator_rounds):
            command = [sys.executable, "-m", "experiments.performance.bench", "--allocator-probe",
                       model, str(batch), str(warmup), str(steps), "keep" if keep else "default"]
            done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
            runs[keep].append(json.loads(done.stdout.strip().splitlines()[-1]))
        for keep, probes in runs.items():
            best = min(probes, key=lambda r: r["step_ms"])  # the run least disturbed
            rows.append({**best, "runs": len(probes), "keep": keep})
            print(rows[-1], flush=True)
    return rows
