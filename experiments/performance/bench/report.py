"""The machine and the markdown tables of results.md."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from experiments.performance.bench.measure import PHASES


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
              "the network | vs previous design |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        overhead = f"{r['overhead']:.1%}" if "overhead" in r else "-"
        forward = f"{r['forward_ms']:.1f}" if "forward_ms" in r else "-"
        design = f"{r['vs_previous_design']:.3f}" if "vs_previous_design" in r else "-"
        lines.append(f"| {r['sampler']} | {r['process']} | {r['target_nfe']} | {r['nfe']} | "
                     f"{r['seconds']:.2f} | {forward} | {overhead} | {design} |")  # fmt: skip
    return lines
