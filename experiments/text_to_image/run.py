"""Text-to-image on MNIST, offline: do prompts move what they name?

The 10k real MNIST test images (../shared/data/mnist-t10k) are captioned from their label and
measured stroke thickness and slant (captions.py: "a thin, slanted seven"), written as an image
folder with metadata.jsonl, and a text-conditional ``unet_small`` (``text_encoder=bytes``) is
trained on them with experiments/fid_vs_nfe's recipe (2,800 steps of batch 64). Then, for each
digit and each of thin/bold × upright/slanted, the prompt in a sentence form no caption has
("a seven, slanted and thin") and, for reference, in the training form ("a thin, slanted
seven"), 20 samples each with DDIM-50 at guidance w ∈ {0, 1, 3}, and measured:
  - digit accuracy: the share a classifier (diffusion.evaluation.classifier, trained on the
    recipe's 9,800 training images; its own held-out accuracy reported) reads as the digit named;
  - thickness: mean measured thickness of "bold" samples minus "thin" ones (the data's own
    gap between its bold and thin tertiles beside it); slant: "slanted" minus "upright".

    python -m experiments.text_to_image.run            # from the repository root
    python -m experiments.text_to_image.run --report   # table.md from results.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_module
from PIL import Image

from diffusion.checkpoints import load_module
from diffusion.evaluate import class_accuracy
from diffusion.evaluation import plots
from diffusion.evaluation.draw import draw, to_uint8
from experiments.mnist_recipe import RECIPE, SHARED, train_to_budget
from experiments.text_to_image import captions as C

HERE = Path(__file__).resolve().parent
RUN, DATA, RESULTS = HERE / "run", HERE / "data", HERE / "results.json"
GUIDANCE = (0.0, 1.0, 3.0)
PER_PROMPT = 20
DDIM = {"_target_": "diffusion.samplers.chain.ddim", "_partial_": True, "steps": 50, "eta": 0.0}
OVERRIDES = [
    "data=image_folder", f"data.root={DATA}", "data.image_size=28", "data.channels=1",
    "data.hflip=false", "text_encoder=bytes",
]  # fmt: skip
RECIPE_DATA = [o for o in RECIPE if o.startswith("data")]  # MNIST: the classifier's data
OWN_DATA = ("data=", "data.root=")  # replaced by the captioned folder
TEXT_RECIPE = [o for o in RECIPE if not o.startswith(OWN_DATA)]


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path) as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def mnist() -> tuple[torch.Tensor, torch.Tensor]:
    images = read_idx(SHARED / "mnist-t10k" / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(SHARED / "mnist-t10k" / "t10k-labels-idx1-ubyte.gz")
    return torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.astype(np.int64))


def prepare() -> dict:
    """The captioned image folder (written once) and the caption statistics."""
    images, labels = mnist()
    texts, cuts = C.caption_dataset(images, labels)
    if not (DATA / "metadata.jsonl").is_file():
        DATA.mkdir(parents=True, exist_ok=True)
        rows = []
        for i, (image, text) in enumerate(zip(images, texts, strict=True)):
            Image.fromarray(image[0].numpy()).save(DATA / f"{i:05d}.png")
            rows.append(json.dumps({"file_name": f"{i:05d}.png", "text": text}))
        (DATA / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    props, groups = C.measure(images), C.words(C.measure(images), cuts)
    gap = {}
    for prop, index, (low, high) in (("thickness", 0, C.THICKNESS), ("slant", 1, C.SLANT)):
        chosen = {w: torch.tensor([g[index] == w for g in groups]) for w in (low, high)}
        gap[prop] = float(props[prop][chosen[high]].mean() - props[prop][chosen[low]].mean())
    return {"cuts": cuts, "data_gap": gap, "distinct_captions": len(set(texts)),
            "example_captions": texts[:5]}  # fmt: skip


def prompts(form) -> list[tuple[str, int, str, str]]:
    return [(form(d, t, s), d, t, s) for d in range(10) for t in C.THICKNESS for s in C.SLANT]


def measure_row(module, form_name: str, w: float, data_cfg) -> dict:
    form = C.held_out if form_name == "held_out" else C.caption
    table = prompts(form)
    texts = [p for p, *_ in table for _ in range(PER_PROMPT)]
    start = time.perf_counter()
    images, nfe = draw(module, len(texts), 200, 0, DDIM, progress=False, prompts=texts,
                       guidance=w)  # fmt: skip
    pixels = to_uint8(images)
    digits = torch.tensor([d for _, d, *_ in table]).repeat_interleave(PER_PROMPT)
    acc, protocol = class_accuracy(pixels, digits, 10, data_cfg, HERE / "cache")
    props = C.measure(pixels)
    thick = [t for *_, t, _ in table for _ in range(PER_PROMPT)]
    slant = [s for *_, s in table for _ in range(PER_PROMPT)]

    def gap(prop: str, words: list[str], low: str, high: str) -> float:
        mask = torch.tensor([x == high for x in words]), torch.tensor([x == low for x in words])
        return float(props[prop][mask[0]].mean() - props[prop][mask[1]].mean())

    return {"form": form_name, "guidance": w, "nfe": nfe, "digit_acc": acc,
            "thickness_gap": gap("thickness", thick, "thin", "bold"),
            "slant_gap": gap("slant", slant, "upright", "slanted"),
            "classifier_val_accuracy": protocol["classifier_val_accuracy"],
            "seconds": round(time.perf_counter() - start, 1),
            "example_prompt": table[14][0]}  # fmt: skip


def load_results() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": {}}


def save(results: dict) -> None:
    RESULTS.write_text(json.dumps(results, indent=2))


def grid(module) -> None:
    """One row per held-out prompt (four digits), 6 samples each, at w = 3."""
    chosen = [p for p in prompts(C.held_out) if p[1] in (1, 4, 7, 8)][::3][:6]
    texts = [p for p, *_ in chosen for _ in range(6)]
    images, _ = draw(module, len(texts), 200, 1, DDIM, progress=False, prompts=texts, guidance=3.0)
    index = torch.arange(len(chosen)).repeat_interleave(6)
    fig = plots.class_grid(images, index, [p for p, *_ in chosen], "held-out prompts, w = 3")
    fig.savefig(HERE / "prompt_grid.png", dpi=plots.DPI)


def report() -> str:
    results = load_results()
    lines = ["| prompts | w | digit accuracy | thickness: bold − thin | slant: slanted − upright |",
             "|---|---|---|---|---|"]  # fmt: skip
    for row in results["rows"].values():
        lines.append(f"| {row['form'].replace('_', '-')} | {row['guidance']:g} | "
                     f"{100 * row['digit_acc']:.1f} % | {row['thickness_gap']:+.2f} px | "
                     f"{row['slant_gap']:+.3f} |")  # fmt: skip
    if "data" in results:
        gap = results["data"]["data_gap"]
        lines.append(f"| the training images' own tertiles | | | {gap['thickness']:+.2f} px | "
                     f"{gap['slant']:+.3f} |")  # fmt: skip
    table = "\n".join(lines) + "\n"
    (HERE / "table.md").write_text(table)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    if args.report:
        print(report())
        return
    results = load_results()
    results["data"] = prepare()
    save(results)
    if not train_to_budget(RUN, OVERRIDES, TEXT_RECIPE):
        return
    module = load_module(RUN / "checkpoints" / "last.ckpt")
    with initialize_config_module("diffusion.conf", version_base="1.3"):
        data_cfg = compose("train", overrides=RECIPE_DATA).data  # the classifier's MNIST split
    for form in ("held_out", "training_form"):
        for w in GUIDANCE:
            key = f"{form}/w={w:g}"
            if key not in load_results()["rows"]:
                results = load_results()
                results["rows"][key] = measure_row(module, form, w, data_cfg)
                save(results)
                print(key, results["rows"][key], flush=True)
    if not (HERE / "prompt_grid.png").exists():
        grid(module)
    print(report())


if __name__ == "__main__":
    main()
