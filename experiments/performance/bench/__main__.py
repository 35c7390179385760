"""``python -m experiments.performance.bench``: run the sections of a profile, write
results.json and results.md."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffusion.allocator import keep_freed_memory
from experiments.performance import bench
from experiments.performance.bench.allocator import allocator, allocator_probe
from experiments.performance.bench.measure import matmul_gflops
from experiments.performance.bench.profiles import HERE, PROFILES
from experiments.performance.bench.report import machine, markdown
from experiments.performance.bench.sampling import sampling
from experiments.performance.bench.training import training
from experiments.performance.bench.variants import variants

SECTIONS = ["training", "variants", "allocator", "sampling"]


def main() -> None:
    parser = argparse.ArgumentParser(description=bench.__doc__.split("\n")[0])
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
