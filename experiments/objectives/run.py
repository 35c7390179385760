"""Prediction targets, loss weightings and a learned variance on real MNIST, at one budget.

Every row trains ``unet_small`` with experiments/fid_vs_nfe's recipe (the 10k MNIST test images,
2,800 steps of batch 64, lr 1e-3, seed 0; a checkpoint also at step 1,400, half the budget) and
differs only in its objective. Then, from the EMA weights: validation bits/dim from the
variational bound (T = 1000 network evaluations per image), and FID of 2,000 samples against
all 10,000 images with ancestral sampling respaced to 50 steps, DDIM-50 and DPM-Solver++ at 20
NFE; at half the budget, FID with DDIM-50 (does min-SNR converge faster?). ``--diagnose``
asks why the FIDs differ: what kind of error each network makes near the data, and how much
noise its samples keep.

    python -m experiments.objectives.run                # every row: train, then measure
    python -m experiments.objectives.run --rows v_simple x0_simple
    python -m experiments.objectives.run --report       # table.md from results.json
    python -m experiments.objectives.run --diagnose --rows eps_simple eps_min_snr

Run from the repository root. Each measurement is appended to results.json as soon as it is
done, and rows or measurements already there are skipped, so the work can be split across
sessions; checkpoints stay in run/ (not committed).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from diffusion.checkpoints import load_module
from diffusion.evaluate import split_images
from diffusion.evaluation import metrics as M
from diffusion.evaluation.draw import draw, to_uint8
from diffusion.evaluation.likelihood import bounds
from diffusion.training.data import to_model_range
from experiments.fid_vs_nfe.bench import BATCH, real_images, reference_features
from experiments.mnist_recipe import RECIPE, SHARED, STEPS, train_run, trained_steps

HERE = Path(__file__).resolve().parent
WEIGHTS = SHARED / "fid-inception" / M.WEIGHTS_NAME
RESULTS = HERE / "results.json"

ROWS = {  # name -> the overrides that make it (everything else is fid_vs_nfe's recipe)
    "eps_simple": [],
    "v_simple": ["module.prediction=v"],
    "x0_simple": ["module.prediction=x0"],
    "eps_min_snr": ["loss_weight=min_snr"],
    "v_min_snr": ["module.prediction=v", "loss_weight=min_snr"],
    "learned_hybrid": ["module.learn_sigma=true"],
}
HALF = STEPS // 2
SAMPLERS = {  # name -> a sampler node; FID rows at full budget
    "ddpm-50": {"_target_": "diffusion.samplers.chain.ddpm_ancestral", "_partial_": True,
                "steps": 50, "variance": "beta", "clip_x0": True, "spacing": "uniform"},
    "ddim-50": {"_target_": "diffusion.samplers.chain.ddim", "_partial_": True, "steps": 50,
                "eta": 0.0, "spacing": "uniform"},
    "dpm_solver-20": {"_target_": "diffusion.samplers.chain.dpm_solver", "_partial_": True,
                      "steps": 20, "spacing": "logsnr"},
}  # fmt: skip
BPD_N = 100  # validation images for bits/dim (T network evaluations each)
DIAGNOSTIC = {  # --diagnose: is a row's DPM-Solver++ loss the logSNR spacing's? (README)
    "dpm_solver-20-uniform": {**SAMPLERS["dpm_solver-20"], "spacing": "uniform"},
}
ERROR_TIMES = (0, 1, 3, 6, 10, 20, 40, 80, 150, 300, 500, 700, 900, 999)  # chain indices
SPECKLE_N = 500  # speckle is measured on the first SPECKLE_N of the samples of each FID
NOISE_SD = (0.0, 0.005, 0.01, 0.02, 0.04)  # noise added to real images, in [-1, 1] units


def checkpoint(row: str, step: int | None = None) -> Path:
    folder = HERE / "run" / row / "checkpoints"
    if step is None:
        return folder / "last.ckpt"
    found = sorted(folder.glob(f"*step={step}*.ckpt"))
    return found[0] if found else folder / f"missing-step={step}.ckpt"


def train(row: str) -> bool:
    """Train one row to the full budget (resuming a stopped run), with a checkpoint also at
    half the budget; True when the row has its full budget."""
    run_dir = HERE / "run" / row
    if trained_steps(run_dir) >= STEPS:
        return True
    half = ("+callbacks.half={_target_:lightning.pytorch.callbacks.ModelCheckpoint,"
            f"dirpath:{run_dir / 'checkpoints'},every_n_train_steps:{HALF},save_top_k:-1}}")
    minutes = train_run(run_dir, ROWS[row], [half])
    before = load_results()["rows"].get(row, {}).get("train_minutes", 0.0)
    record(row, "train_minutes", round(before + minutes, 1))
    return trained_steps(run_dir) >= STEPS


def load_results() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": {}}


def record(row: str, key: str, value) -> None:
    """Write one measurement of one row to results.json at once (re-read first)."""
    results = load_results()
    results["rows"].setdefault(row, {"overrides": ROWS[row]})[key] = value
    save(results, f"{row} {key}", value)


def record_real(key: str, value) -> None:
    """Write one measurement of the real images (the controls of --diagnose) the same way."""
    results = load_results()
    results.setdefault("real", {})[key] = value
    save(results, f"real {key}", value)


def save(results: dict, label: str, value) -> None:
    results["protocol"] = {
        "recipe": RECIPE, "half_budget_step": HALF, "fid_n": 2000, "fid_batch": BATCH,
        "fid_seed": 0, "reference": "MNIST test split, all 10,000 images, 28x28",
        "bpd": f"variational bound, first {BPD_N} validation images (data.val_fraction=0.02)",
        "machine": f"{platform.processor() or platform.machine()}, "
                   f"{torch.get_num_threads()} threads, torch {torch.__version__}",
    }  # fmt: skip
    RESULTS.write_text(json.dumps(results, indent=2))
    print(label, value, flush=True)


def fid(module, sampler: dict, extractor, real: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """FID of 2,000 samples (with their NFE and sampling seconds), and the samples as uint8."""
    start = time.perf_counter()
    images, nfe = draw(module, 2000, BATCH, 0, sampler, progress=False)
    seconds = time.perf_counter() - start
    images = to_uint8(images)
    fake = M.extract(extractor, images, batch_size=100)["pool"]
    return {"fid": M.frechet_distance(fake, real), "nfe": nfe, "seconds": round(seconds, 1)}, images


def validation_images(module) -> torch.Tensor:
    """The first BPD_N validation images of the row's data split, in [-1, 1]."""
    return to_model_range(split_images(OmegaConf.create(module.hparams.data), "val", BPD_N))


def record_fids(row: str, module, samplers: dict, done: dict, extractor, real) -> None:
    """FID and speckle of each sampler not yet in ``done``, under fid/<name>, speckle/<name>."""
    for name, sampler in samplers.items():
        if f"fid/{name}" not in done or f"speckle/{name}" not in done:
            value, images = fid(module, sampler, extractor, real)
            record(row, f"fid/{name}", value)
            record(row, f"speckle/{name}", speckle(images[:SPECKLE_N]))


def speckle(images: torch.Tensor) -> float:
    """Noise left in the background of uint8 images: the mean |x - median₃(x)| (3 x 3 median, in
    gray levels) over the pixels darker than 16. MNIST's background is flat, a constant offset
    does not count, and noise of s.d. 0.005 in [-1, 1] (0.6 gray levels) shows (the real-image
    controls of --diagnose, NOISE_SD, say how much speckle and FID each noise level gives)."""
    x = images.float()
    patches = F.pad(x, (1, 1, 1, 1), mode="replicate").unfold(2, 3, 1).unfold(3, 3, 1)
    median = patches.reshape(*x.shape, 9).median(-1).values
    return float((x - median).abs()[x < 16].mean())


def noisy(images: torch.Tensor, sd: float) -> torch.Tensor:
    """uint8 images with Gaussian noise of standard deviation ``sd`` (in [-1, 1]) added."""
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    return to_uint8(to_model_range(images) + sd * noise)


def real_controls(extractor, real: torch.Tensor) -> None:
    """How speckle and FID answer noise alone: the first 2,000 real images with Gaussian noise
    of each NOISE_SD added, against all 10,000 clean ones."""
    done = load_results().get("real", {})
    images = real_images()[:2000]
    for sd in NOISE_SD:
        if f"noise={sd}" not in done:
            shown = noisy(images, sd)
            fake = M.extract(extractor, shown, batch_size=100)["pool"]
            value = {"speckle": speckle(shown), "fid": M.frechet_distance(fake, real)}
            record_real(f"noise={sd}", value)


def measure(row: str, extractor, real: torch.Tensor) -> None:
    done = load_results()["rows"].get(row, {})
    module = load_module(checkpoint(row))
    record_fids(row, module, SAMPLERS, done, extractor, real)
    variances = ("learned",) if module.hparams.get("learn_sigma") else ("beta", "beta_tilde")
    if any(f"bpd/{v}" not in done for v in variances):
        x0 = validation_images(module)
        start = time.perf_counter()
        terms = bounds(module.predictor(), x0, variances, torch.Generator().manual_seed(0))
        seconds = round(time.perf_counter() - start, 1)
        for variance, parts in terms.items():
            record(row, f"bpd/{variance}",
                   {**{k: float(v.mean()) for k, v in parts.items()}, "seconds": seconds})
    if "fid_half/ddim-50" not in done and checkpoint(row, HALF).exists():
        half = load_module(checkpoint(row, HALF))
        record(row, "fid_half/ddim-50", fid(half, SAMPLERS["ddim-50"], extractor, real)[0])


def prediction_errors(module) -> dict[str, list[float]]:
    """E‖ε̂ - ε‖² and E‖x̂_0 - x_0‖² per pixel at each of ERROR_TIMES, on the bits/dim images with
    one fixed draw of ε: where along the chain an objective leaves the network inaccurate.

    And of what kind: since x̂_0 - x_0 = -(σ/m)(ε̂ - ε), writing ε̂ - ε = -r ε + u with u ⟂ ε
    splits the error into the noise x̂_0 leaves in the image, r = 1 - ⟨ε̂, ε⟩/‖ε‖² of it
    (``noise_left``: 0 when x̂_0 removes all of ε, 1 when it removes none), and the rest,
    ‖u‖² per pixel (``other_mse``; ε-MSE = r² ‖ε‖²/D + ‖u‖²/D)."""
    x0 = validation_images(module)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    keys = ("eps_mse", "x0_mse", "noise_left", "other_mse")
    predictor, errors = module.predictor(), {"t": list(ERROR_TIMES), **{k: [] for k in keys}}
    with torch.no_grad():
        for t in ERROR_TIMES:
            times = torch.full((len(x0),), float(t), dtype=torch.float64)
            m, sigma = (v.float().view(-1, 1, 1, 1) for v in module.process.marginal(times))
            pred = predictor(m * x0 + sigma * eps, times)
            errors["eps_mse"].append(float((pred.eps_hat - eps).pow(2).mean()))
            errors["x0_mse"].append(float((pred.x0_hat - x0).pow(2).mean()))
            r = 1 - (pred.eps_hat * eps).sum() / eps.pow(2).sum()
            errors["noise_left"].append(float(r))
            errors["other_mse"].append(float((pred.eps_hat - eps + r * eps).pow(2).mean()))
    return errors


def diagnose(row: str, extractor, real: torch.Tensor) -> None:
    done = load_results()["rows"].get(row, {})
    module = load_module(checkpoint(row))
    if "noise_left" not in done.get("errors", {}):
        record(row, "errors", prediction_errors(module))
    record_fids(row, module, DIAGNOSTIC, done, extractor, real)


def report() -> str:
    results = load_results()
    rows = results["rows"]

    def cell(row: dict, key: str, field: str, fmt: str = "{:.2f}") -> str:
        return fmt.format(row[key][field]) if key in row else "-"

    lines = [
        "| row | objective | bpd (VLB) | FID ancestral-50 | FID DDIM-50 | FID DPM-Solver++ 20 "
        "| FID DDIM-50 at half budget | train min | FID DPM-Solver++ 20, uniform (--diagnose) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        bpd = (
            cell(row, "bpd/learned", "total", "{:.3f} (learned Σ)")
            if "bpd/learned" in row
            else f"{cell(row, 'bpd/beta', 'total', '{:.3f}')} (β) / "
            f"{cell(row, 'bpd/beta_tilde', 'total', '{:.3f}')} (β̃)"
        )
        lines.append(
            f"| {name} | {' '.join(row['overrides']) or 'eps, simple'} | {bpd} | "
            f"{cell(row, 'fid/ddpm-50', 'fid')} | {cell(row, 'fid/ddim-50', 'fid')} | "
            f"{cell(row, 'fid/dpm_solver-20', 'fid')} | {cell(row, 'fid_half/ddim-50', 'fid')} | "
            f"{row.get('train_minutes', '-')} | {cell(row, 'fid/dpm_solver-20-uniform', 'fid')} |"
        )
    table = "\n".join(lines) + "\n\n" + diagnosis_tables(results)
    (HERE / "table.md").write_text(table)
    return table


def diagnosis_tables(results: dict) -> str:
    """--diagnose's measurements: what kind of error each row's network makes near the data, the
    noise its samples keep, and how speckle and FID answer noise added to real images."""
    shown, samplers = (0, 3, 10, 20, 80), {**SAMPLERS, **DIAGNOSTIC}
    deterministic = [name for name, s in samplers.items() if "ancestral" not in s["_target_"]]
    lines = [
        "| row | noise left in x̂_0, r, at t = " + " / ".join(map(str, shown))
        + " | x̂_0-MSE at t = 0 / 10 | speckle: " + " / ".join(samplers) + " |",
        "|---|---|---|---|",
    ]  # fmt: skip
    for name, row in results["rows"].items():
        errors = row.get("errors", {})
        if "noise_left" not in errors:
            continue
        at = {t: i for i, t in enumerate(errors["t"])}
        left = " / ".join(f"{errors['noise_left'][at[t]]:.2f}" for t in shown)
        x0_mse = " / ".join(f"{errors['x0_mse'][at[t]]:.1e}" for t in (0, 10))
        spots = " / ".join(
            f"{row[f'speckle/{s}']:.2f}" if f"speckle/{s}" in row else "-" for s in samplers
        )
        lines.append(f"| {name} | {left} | {x0_mse} | {spots} |")
    for names in (list(samplers), deterministic):
        pairs = [(row[f"speckle/{s}"], row[f"fid/{s}"]["fid"]) for row in results["rows"].values()
                 for s in names if f"speckle/{s}" in row and f"fid/{s}" in row]  # fmt: skip
        if len(pairs) > 2:
            ranks = torch.tensor(pairs).argsort(0).argsort(0).double()
            rho = float(torch.corrcoef(ranks.T)[0, 1])
            lines += ["", f"Spearman rank correlation of speckle and FID over the {len(pairs)} "
                          f"(row, sampler) pairs of {', '.join(names)}: {rho:.2f}"]  # fmt: skip
    lines += ["", "| real images + noise of s.d. | speckle | FID (2,000 vs 10,000) |"]
    lines.append("|---|---|---|")
    for key, real in results.get("real", {}).items():
        sd = key.removeprefix("noise=")
        lines.append(f"| {sd} | {real['speckle']:.2f} | {real['fid']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", nargs="*", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--diagnose", action="store_true",
                        help="trained rows only: the kind of error the network makes along "
                             "the chain, the DIAGNOSTIC samplers' FID, the noise left in "
                             "samples (speckle), and how speckle and FID answer noise added to "
                             "real images")  # fmt: skip
    args = parser.parse_args()
    if args.report:
        print(report())
        return
    extractor = real = None
    for row in args.rows:
        if args.diagnose and trained_steps(HERE / "run" / row) < STEPS:
            print(f"{row}: not trained to step {STEPS}; nothing to diagnose", flush=True)
            continue
        if not train(row):
            print(f"{row}: training stopped before step {STEPS}; run again to resume", flush=True)
            return
        if args.train_only:
            continue
        if extractor is None:
            extractor = M.InceptionFeatures(str(WEIGHTS))
            real = reference_features(extractor)
            if args.diagnose:
                real_controls(extractor, real)
        (diagnose if args.diagnose else measure)(row, extractor, real)
    print(report())


if __name__ == "__main__":
    main()
