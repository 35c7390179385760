"""FID against the 10k MNIST test images and sampling time per sampler and NFE, from one
checkpoint. FID rows are appended to results.json as they finish (the slowest, DDPM at 1000
steps, last), so an interrupted run keeps what it measured. Sampling time comes from a separate
`--time` pass that times every row back to back on the same 100 images in one run, so the
times compare even when the long FID passes shared the machine. `--report` writes table.md and
the plot.

    python bench.py checkpoint.ckpt [--weights PATH] [--n 2000] [--rows ddim:20 ...]
    python bench.py checkpoint_edm.ckpt --model edm --rows heun:9 heun:18
    python bench.py checkpoint.ckpt --time [--time-n 100]
    python bench.py --report

Rows are keyed by (model, sampler, steps); ``--model`` names the checkpoint's row group (``ddpm``,
the default, is train.sh's checkpoint; ``edm`` is train_edm.sh's).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from diffusion.checkpoints import load_module
from diffusion.evaluation import metrics as M
from diffusion.evaluation.draw import draw, to_uint8
from diffusion.training.data import TorchvisionDataModule

HERE = Path(__file__).parent
BATCH = 50  # faster per image than 250 on this CPU (cache-sized activations)
RESULTS = HERE / "results.json"
ROWS = (
    [("dpm_solver", s) for s in (10, 17, 20, 35, 50, 100)]
    + [("ddim", s) for s in (10, 17, 20, 35, 50, 100)]
    + [("heun", s) for s in (9, 18)]  # 17 and 35 NFE (EDM's sampler; issue #15)
    + [("ddpm", 1000)]
)
SAMPLERS = {
    "ddim": {
        "_target_": "diffusion.samplers.chain.ddim",
        "_partial_": True,
        "eta": 0.0,
        "spacing": "uniform",
    },
    "dpm_solver": {
        "_target_": "diffusion.samplers.chain.dpm_solver",
        "_partial_": True,
        "spacing": "logsnr",
    },
    "ddpm": {
        "_target_": "diffusion.samplers.chain.ddpm_ancestral",
        "_partial_": True,
        "variance": "beta",
        "clip_x0": True,
    },
    "heun": {  # EDM's Algorithm 2, deterministic, on the process's own sigma range
        "_target_": "diffusion.samplers.karras.heun",
        "_partial_": True,
        "rho": 7.0,
    },
}


def real_images() -> torch.Tensor:
    """All 10,000 MNIST test images, uint8 (N, 1, 28, 28): the FID reference."""
    dm = TorchvisionDataModule(
        "mnist", str(HERE / "data"), image_size=28, channels=1, val_fraction=1e-4
    )
    return dm.load().images


def reference_features(extractor) -> torch.Tensor:
    def compute():
        return M.extract(extractor, real_images(), batch_size=100)["pool"]

    return M.cached_reference_features("mnist-t10k/all/28/inception", compute, HERE / "cache")


def draw_resumably(module, n: int, sampler: dict, key: str) -> tuple[torch.Tensor, int]:
    """``n`` samples in batches of BATCH, batch i seeded by i, each saved to cache/ as it is
    done and reused by a later run (the sampling time then covers only the new batches)."""
    folder = HERE / "cache" / f"{key}_n{n}_b{BATCH}"
    folder.mkdir(parents=True, exist_ok=True)
    batches, nfe = [], 0
    for i, start in enumerate(range(0, n, BATCH)):
        path = folder / f"{i:04d}.pt"
        if path.exists():
            saved = torch.load(path)
            batches.append(saved["images"])
            nfe = saved["nfe"]
            continue
        images, nfe = draw(module, min(BATCH, n - start), BATCH, i, sampler, progress=False)
        torch.save({"images": images, "nfe": nfe}, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
        batches.append(images)
    return torch.cat(batches), nfe


def measure(
    ckpt: str, weights: str, n: int, rows: list[tuple[str, int]], model: str = "ddpm"
) -> None:
    torch.manual_seed(0)
    module = load_module(ckpt)
    extractor = M.InceptionFeatures(weights)
    real = reference_features(extractor)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": []}
    results["protocol"] = {
        **results.get("protocol", {}), f"checkpoint_{model}": str(ckpt), "n_samples": n,
        "seed": 0, "batch_size": BATCH, "ema": True,
        "reference": "MNIST test split, all 10,000 images, 28x28",
        "features": "FID Inception-v3 pool_3 (torch-fidelity), grayscale repeated to RGB",
        "machine": f"{platform.processor() or platform.machine()}, "
                   f"{torch.get_num_threads()} threads, torch {torch.__version__}",
    }  # fmt: skip
    done = {(r.get("model", "ddpm"), r["sampler"], r["steps"]) for r in results["rows"]}
    for name, steps in rows:
        if (model, name, steps) in done:
            continue
        sampler = {**SAMPLERS[name], "steps": steps}
        start = time.perf_counter()
        if name == "ddpm":  # 1000 NFE: hours; batches are kept so an interrupted run resumes
            images, nfe = draw_resumably(module, n, sampler, f"{name}_{steps}")
        else:
            images, nfe = draw(module, n, BATCH, 0, sampler, progress=False)
        seconds = time.perf_counter() - start
        fake = M.extract(extractor, to_uint8(images), batch_size=100)["pool"]
        row = {"model": model, "sampler": name, "steps": steps, "nfe": nfe,
               "fid": M.frechet_distance(fake, real),
               "sampling_seconds": round(seconds, 1),
               "seconds_per_image": round(seconds / n, 4)}  # fmt: skip
        # re-read: a --time pass may have written the file while this row was drawn
        latest = json.loads(RESULTS.read_text()) if RESULTS.exists() else results
        results = {**latest, "protocol": results["protocol"]}
        results["rows"] = [*latest.get("rows", []), row]
        RESULTS.write_text(json.dumps(results, indent=2))
        print(row, flush=True)


def time_rows(ckpt: str, n: int = 100) -> None:
    """Seconds per image for every row, timed back to back in this process on ``n`` images."""
    torch.manual_seed(0)
    module = load_module(ckpt)
    draw(module, BATCH, BATCH, 0, {**SAMPLERS["ddim"], "steps": 5}, progress=False)  # warm-up
    timing = {}
    for name, steps in ROWS:
        start = time.perf_counter()
        _, nfe = draw(module, n, BATCH, 0, {**SAMPLERS[name], "steps": steps}, progress=False)
        seconds = time.perf_counter() - start
        timing[f"{name}:{steps}"] = {"nfe": nfe, "seconds_per_image": seconds / n,
                                     "ms_per_image_per_nfe": 1000 * seconds / n / nfe}  # fmt: skip
        print(name, steps, timing[f"{name}:{steps}"], flush=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": []}
    results["timing"] = {
        "images": n, "batch_size": BATCH, "rows": timing,
        "machine": f"{platform.processor() or platform.machine()}, "
                   f"{torch.get_num_threads()} threads, torch {torch.__version__}",
    }  # fmt: skip
    RESULTS.write_text(json.dumps(results, indent=2))


def report() -> None:
    from matplotlib.figure import Figure

    results = json.loads(RESULTS.read_text())
    for r in results["rows"]:
        r.setdefault("model", "ddpm")  # rows from before EDM's model
    rows = sorted(results["rows"], key=lambda r: (r["model"], r["sampler"], r["nfe"]))
    timing = results.get("timing", {}).get("rows", {})
    ddpm = timing.get("ddpm:1000", {}).get("seconds_per_image")
    lines = [
        "| model | sampler | NFE | FID | s / image | time vs DDPM-1000 | ms / image / NFE |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = timing.get(f"{r['sampler']}:{r['steps']}", {}) if r["model"] == "ddpm" else {}
        per_image = t.get("seconds_per_image")
        cells = [
            r["model"],
            r["sampler"],
            r["nfe"],
            f"{r['fid']:.2f}",
            f"{per_image:.3f}" if per_image else "-",
            f"{per_image / ddpm:.3f}" if per_image and ddpm else "-",
            f"{t['ms_per_image_per_nfe']:.2f}" if t else "-",
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    (HERE / "table.md").write_text("\n".join(lines) + "\n")
    fig = Figure(figsize=(6, 4), dpi=100, layout="constrained")
    ax = fig.subplots()
    for model, name in sorted({(r["model"], r["sampler"]) for r in rows}):
        pts = [(r["nfe"], r["fid"]) for r in rows if (r["model"], r["sampler"]) == (model, name)]
        if pts:
            label = f"{model} model, {name}"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("network evaluations per sample (NFE, log scale)")
    ax.set_ylabel(f"FID vs MNIST test (n = {results['protocol']['n_samples']})")
    ax.set_title("Sample quality per network evaluation")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.savefig(HERE / "fid_vs_nfe.png")
    print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("ckpt", nargs="?")
    parser.add_argument(
        "--weights", default=str(HERE / "../../../shared/data/fid-inception/" / M.WEIGHTS_NAME)
    )
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--rows", nargs="*", default=None, help="e.g. ddim:20 dpm_solver:20")
    parser.add_argument("--model", default="ddpm", help="the checkpoint's row group: ddpm, edm")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--time", action="store_true", help="the timing pass only")
    parser.add_argument("--time-n", type=int, default=100, help="images per timed row")
    args = parser.parse_args()
    if args.report:
        report()
    elif args.time:
        time_rows(args.ckpt, args.time_n)
    else:
        rows = [(r.split(":")[0], int(r.split(":")[1])) for r in args.rows] if args.rows else ROWS
        measure(args.ckpt, args.weights, args.n, rows, args.model)
