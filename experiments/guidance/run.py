"""Classifier-free guidance on real MNIST: FID and class accuracy against the guidance strength.

One class-conditional ``unet_small`` (model.num_classes=10, p_uncond = 0.1) trained with
experiments/fid_vs_nfe's recipe on the 10k MNIST test images and their labels; then, from its
EMA weights, 2,000 class-balanced samples (200 per digit, seed 0) at each guidance w ∈ {0, 0.5,
1, 2, 4} with DDIM-50 and DPM-Solver++(2M) at 20 NFE, and the unconditional row (∅, no labels)
of the same model with each sampler: FID against all 10,000 images, and class accuracy, the
share of samples a small CNN (diffusion.evaluation.classifier, trained on the 9,800 training
images) reads as the digit asked for (its own accuracy on the 200 held-out images is reported).

    python -m experiments.guidance.run            # from the repository root: train, measure
    python -m experiments.guidance.run --report   # table.md from results.json
    python -m experiments.guidance.run --samplers dpm_solver-20   # one sampler's rows (a 2nd core)

Each measurement goes to results.json as soon as it is made and is skipped when there, so the
work can be split across sessions (the checkpoint stays in run/, not committed).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from diffusion.checkpoints import load_module
from diffusion.evaluate import class_accuracy
from diffusion.evaluation import metrics as M
from diffusion.evaluation.draw import balanced_labels, draw, to_uint8
from experiments.fid_vs_nfe.bench import BATCH, reference_features
from experiments.mnist_recipe import RECIPE, SHARED, train_to_budget

HERE = Path(__file__).resolve().parent
RUN = HERE / "run"
RESULTS = HERE / "results.json"
WEIGHTS = SHARED / "fid-inception" / M.WEIGHTS_NAME
N = 2000
GUIDANCE = (0.0, 0.5, 1.0, 2.0, 4.0)
SAMPLERS = {
    "ddim-50": {"_target_": "diffusion.samplers.chain.ddim", "_partial_": True, "steps": 50,
                "eta": 0.0, "spacing": "uniform"},
    "dpm_solver-20": {"_target_": "diffusion.samplers.chain.dpm_solver", "_partial_": True,
                      "steps": 20, "spacing": "logsnr"},
}  # fmt: skip
OVERRIDES = ["model.num_classes=10"]


def load_results() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": {}}


def record(key: str, value: dict) -> None:
    results = load_results()
    results["rows"][key] = value
    results["protocol"] = {
        "recipe": [*RECIPE, *OVERRIDES], "n": N, "labels": "class-balanced, 200 per digit",
        "batch": BATCH, "seed": 0, "reference": "MNIST test split, all 10,000 images, 28x28",
        "machine": f"{platform.processor() or platform.machine()}, "
                   f"{torch.get_num_threads()} threads, torch {torch.__version__}",
    }  # fmt: skip
    RESULTS.write_text(json.dumps(results, indent=2))
    print(key, value, flush=True)


def measure(samplers: list[str]) -> None:
    module = load_module(RUN / "checkpoints" / "last.ckpt")
    extractor = M.InceptionFeatures(str(WEIGHTS))
    real = reference_features(extractor)
    data = OmegaConf.create(module.hparams.data)
    labels = balanced_labels(N, module.num_classes, grouped=True)
    rows = [(name, w) for name in samplers for w in (None, *GUIDANCE)]  # None: unconditional
    for name, w in rows:
        key = f"{name}/{'unconditional' if w is None else f'w={w:g}'}"
        if key in load_results()["rows"]:  # re-read: another process may have measured it
            continue
        start = time.perf_counter()
        images, nfe = draw(module, N, BATCH, 0, SAMPLERS[name], progress=False,
                           labels=None if w is None else labels, guidance=w or 0.0)  # fmt: skip
        seconds = round(time.perf_counter() - start, 1)
        pixels = to_uint8(images)
        fake = M.extract(extractor, pixels, batch_size=100)["pool"]
        acc, protocol = class_accuracy(pixels, labels, module.num_classes, data, HERE / "cache")
        record(key, {"sampler": name, "guidance": w, "nfe": nfe,
                     "fid": M.frechet_distance(fake, real),
                     "class_acc": None if w is None else acc,  # ∅ asks for no class
                     "classifier_val_accuracy": protocol["classifier_val_accuracy"],
                     "seconds": seconds})  # fmt: skip


def report() -> str:
    rows = load_results()["rows"]
    order = list(SAMPLERS)
    rows = dict(sorted(rows.items(), key=lambda kv: (order.index(kv[1]["sampler"]),
                                                      -1 if kv[1]["guidance"] is None
                                                      else kv[1]["guidance"])))  # fmt: skip
    lines = ["| sampler | guidance w | FID | class accuracy |", "|---|---|---|---|"]
    for r in rows.values():
        w = "∅ (unconditional)" if r["guidance"] is None else f"{r['guidance']:g}"
        acc = "-" if r["guidance"] is None else f"{100 * r['class_acc']:.1f} %"
        lines.append(f"| {r['sampler']} | {w} | {r['fid']:.2f} | {acc} |")
    if rows:
        first = next(iter(rows.values()))
        lines.append(f"\nClassifier accuracy on the held-out images: "
                     f"{100 * first['classifier_val_accuracy']:.1f} %")  # fmt: skip
    table = "\n".join(lines) + "\n"
    (HERE / "table.md").write_text(table)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument(
        "--samplers",
        nargs="*",
        choices=list(SAMPLERS),
        default=list(SAMPLERS),
        help="measure these only (two processes can share the rows)",
    )
    args = parser.parse_args()
    if args.report:
        print(report())
        return
    if not train_to_budget(RUN, OVERRIDES):
        return
    if not args.train_only:
        measure(args.samplers)
        print(report())


if __name__ == "__main__":
    main()
