"""Measure a checkpoint the way papers do: ``python -m diffusion.evaluate ckpt=<path> n=10000
metrics=[fid,kid,is,bpd]``.

- ``fid``, ``kid``, ``is``: ``n`` samples (configured sampler; default: the checkpoint's) against
  the reference images (the checkpoint's dataset, ``reference_split``, at the model's resolution),
  on FID Inception features (diffusion.metrics). Reference features are cached on disk per
  dataset, split, resolution and count.
- ``bpd``: bits per dimension from the variational bound (diffusion.likelihood) on ``bpd_n``
  validation images, T network evaluations per image.
- A class-conditional checkpoint draws class-balanced labels with guidance ``guidance`` = w;
  ``class_acc`` is the share of samples a small classifier trained on the training split
  assigns to their class, reported with that classifier's own validation accuracy
  (diffusion.evaluation.classifier; cached in ``cache_dir``).

Results and their protocol go to ``metrics.json`` in the run directory and to the logger.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from diffusion.allocator import keep_freed_memory
from diffusion.checkpoints import CHECKPOINT_FIELDS, checkpoint_id, load_checkpoint, pick_device
from diffusion.config import OPTIONAL_NODE, Field, build, build_loggers, check_fields
from diffusion.errors import ConfigError, exit_on_user_error
from diffusion.evaluation import metrics as M
from diffusion.evaluation.classifier import accuracy, cached_classifier
from diffusion.evaluation.draw import balanced_labels, draw, to_uint8
from diffusion.evaluation.likelihood import bits_per_dim
from diffusion.evaluation.ode_likelihood import ode_bits_per_dim
from diffusion.training.data import to_model_range

METRICS = ("fid", "kid", "is", "class_acc", "bpd")
FIELDS = {
    **CHECKPOINT_FIELDS, "metrics": Field("list", choices=METRICS), "n": Field("int", 2),
    "batch_size": Field("int", 1), "reference_split": Field("choice", choices=("train", "val")),
    "reference_n": Field("int", 2, nullable=True),
    "inception_weights": Field("file", nullable=True),
    "cache_dir": Field("dir"), "kid_subsets": Field("int", 1), "kid_subset_size": Field("int", 2),
    "bpd_n": Field("int", 1), "bpd_batch_size": Field("int", 1),
    "bpd_variance": Field("choice", choices=("beta", "beta_tilde"), nullable=True),
    "guidance": Field("float", 0),
    "data": OPTIONAL_NODE, "logger": OPTIONAL_NODE,
    "callbacks": OPTIONAL_NODE,  # logger=none sets callbacks.lr_monitor (train's); unused here
}  # fmt: skip
"""The top-level keys of ``python -m diffusion.evaluate``."""


def data_config(cfg: DictConfig, module) -> DictConfig:
    if cfg.get("data"):
        return cfg.data
    if module.hparams.get("data"):
        return OmegaConf.create(module.hparams.data)
    raise ConfigError(
        "the checkpoint does not name its dataset; choose one: data=mnist data.root=..."
    )


def split_images(data_cfg: DictConfig, split: str, limit: int | None) -> torch.Tensor:
    """uint8 images (N, C, H, W) of the data module's ``split`` (train or val)."""
    return split_items(data_cfg, split, limit)[0]


def split_items(
    data_cfg: DictConfig, split: str, limit: int | None, labels: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 images (N, C, H, W) of the data module's ``split`` and, with ``labels``, theirs."""
    datamodule = build(data_cfg, "data")
    datamodule.labels = labels
    datamodule.prepare_data()
    datamodule.setup("fit")
    dataset = datamodule.train_set if split == "train" else datamodule.val_set
    items = [dataset[i] for i in range(len(dataset) if limit is None else min(limit, len(dataset)))]
    if not labels:
        return torch.stack(items), None
    return torch.stack([x for x, _ in items]), torch.stack([torch.as_tensor(y) for _, y in items])


def run(cfg: DictConfig, feature_extractor: M.FeatureFn | None = None) -> dict:
    """Evaluate as configured; returns what is written to ``metrics.json``.

    ``feature_extractor`` replaces the Inception network (tests inject a small one).
    """
    if OmegaConf.is_missing(cfg, "ckpt"):
        raise ConfigError("which checkpoint? give ckpt=outputs/runs/<run>/checkpoints/last.ckpt")
    if isinstance(cfg.get("metrics"), ListConfig):
        unknown = sorted(set(cfg.metrics) - set(METRICS))
        if unknown:
            raise ConfigError(f"unknown metric(s) {unknown}; choose from {list(METRICS)}")
    check_fields(cfg, FIELDS, "evaluate")
    device = pick_device(cfg.device)
    if cfg.get("keep_freed_memory") and device.type == "cpu":
        keep_freed_memory()  # diffusion/allocator.py
    module = load_checkpoint(cfg, device)
    data_cfg = data_config(cfg, module)
    if not module.num_classes and ("class_acc" in cfg.metrics or cfg.guidance):
        key = "metrics=[class_acc]" if "class_acc" in cfg.metrics else f"guidance={cfg.guidance}"
        raise ConfigError(
            f"{key} needs a class-conditional checkpoint; {Path(cfg.ckpt).name} was trained "
            "without classes (model.num_classes=0)"
        )
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result: dict = {
        "ckpt": checkpoint_id(cfg.ckpt),
        "protocol": {"seed": cfg.seed, "use_ema": cfg.use_ema},
    }

    sample_metrics = [m for m in cfg.metrics if m in ("fid", "kid", "is", "class_acc")]
    if sample_metrics:
        sampler = OmegaConf.to_container(cfg.sampler, resolve=True) if cfg.get("sampler") else None
        labels = balanced_labels(cfg.n, module.num_classes)  # None: unconditional
        images, nfe = draw(module, cfg.n, cfg.batch_size, cfg.seed, sampler, cfg.use_ema,
                           labels=labels, guidance=cfg.guidance)  # fmt: skip
        result["protocol"].update(n_samples=cfg.n, sampler=sampler or module.hparams.sampler,
                                  nfe=nfe)  # fmt: skip
        if labels is not None:
            result["protocol"].update(labels="class-balanced", guidance=cfg.guidance)
    if "class_acc" in sample_metrics:
        result["class_acc"], result["protocol"]["class_acc"] = class_accuracy(
            to_uint8(images), labels, module.num_classes, data_cfg, cfg.cache_dir
        )
    if set(sample_metrics) - {"class_acc"}:
        extractor = feature_extractor or M.InceptionFeatures(cfg.inception_weights).to(device)
        fake = M.extract(extractor, to_uint8(images), device=device)
        extractor_name = getattr(extractor, "name", type(extractor).__name__)
        ref_key = json.dumps(
            {"data": OmegaConf.to_container(data_cfg, resolve=True), "split": cfg.reference_split,
             "n": cfg.reference_n, "features": extractor_name},
            sort_keys=True,
        )  # fmt: skip
        real = M.cached_reference_features(
            ref_key,
            lambda: M.extract(
                extractor,
                split_images(data_cfg, cfg.reference_split, cfg.reference_n),
                device=device,
            )["pool"],
            cfg.cache_dir,
        )
        result["protocol"].update(
            reference={"dataset": data_cfg.get("dataset", data_cfg._target_.rsplit(".", 1)[-1]),
                       "split": cfg.reference_split, "n": int(real.shape[0]),
                       "image_size": int(data_cfg.image_size)},
            features="FID Inception-v3 (TF 2015-12-05), pool_3 2048-d, via torch-fidelity",
        )  # fmt: skip
        if "fid" in sample_metrics:
            result["fid"] = M.frechet_distance(fake["pool"], real)
        if "kid" in sample_metrics:
            mean, std = M.kernel_inception_distance(
                fake["pool"], real, cfg.kid_subsets, cfg.kid_subset_size, cfg.seed
            )
            result["kid"], result["kid_std"] = mean, std
        if "is" in sample_metrics:
            if "logits" not in fake:
                raise ConfigError("the feature extractor gives no logits, so no Inception Score")
            result["is"], result["is_std"] = M.inception_score(fake["logits"])

    if "bpd" in cfg.metrics:
        result["bpd"], result["protocol"]["bpd"], terms = bits_per_dim_of(module, data_cfg, cfg)
        if terms:
            result["bpd_terms"] = terms

    result["seconds"] = round(time.perf_counter() - start, 2)
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    log_results(cfg, result)
    return result


def class_accuracy(
    samples: torch.Tensor, labels: torch.Tensor, num_classes: int, data_cfg: DictConfig, cache_dir
) -> tuple[float, dict]:
    """The share of uint8 ``samples`` a classifier of the data assigns to ``labels``, and the
    protocol: the classifier and its accuracy on the validation split."""
    key = json.dumps({"data": OmegaConf.to_container(data_cfg, resolve=True),
                      "classifier": "SmallClassifier/v1"}, sort_keys=True)  # fmt: skip
    model, test_accuracy = cached_classifier(
        key, lambda: split_items(data_cfg, "train", None, labels=True),
        lambda: split_items(data_cfg, "val", None, labels=True), samples.shape[1], num_classes,
        cache_dir,
    )  # fmt: skip
    protocol = {"classifier": "SmallClassifier (2 conv blocks), 3 epochs on the training split",
                "classifier_val_accuracy": test_accuracy}  # fmt: skip
    return accuracy(model, samples, labels), protocol


def bits_per_dim_of(module, data_cfg: DictConfig, cfg: DictConfig) -> tuple[float, dict, dict]:
    """Bits per dimension on the validation images: DDPM's variational bound, or the
    probability-flow ODE likelihood for the SDE families; (bpd, protocol, terms)."""
    pixels = split_images(data_cfg, "val", cfg.bpd_n)
    model = module.predictor(cfg.use_ema)
    generator = torch.Generator().manual_seed(cfg.seed)
    process = module.process
    if "vlb" not in process.offers and "sde" in process.offers:
        parts = [
            ode_bits_per_dim(model, batch, generator, device=module.device)
            for batch in pixels.split(cfg.bpd_batch_size)
        ]
        bpd = torch.cat([p[0] for p in parts])
        protocol = {"n_images": int(pixels.shape[0]), "split": "val",
                    "method": "probability-flow ODE (RK45, rtol=atol=1e-5), Hutchinson "
                              "(Rademacher), uniform dequantization",
                    "nfe_mean": sum(p[1] for p in parts) / len(parts)}  # fmt: skip
        return float(bpd.mean()), protocol, {}
    if "vlb" not in process.offers:
        raise ConfigError(
            f"bpd needs a likelihood: a variational bound (process=ddpm) or an SDE view for the "
            f"probability-flow ODE; process={process.family} has neither. Drop bpd from metrics"
        )
    if module.hparams.get("learn_sigma"):
        variance = "learned"
    else:
        variance = cfg.bpd_variance or module.hparams.sampler.get("variance", "beta_tilde")
    x0 = to_model_range(pixels).to(module.device)
    parts = [
        bits_per_dim(model, batch, variance, generator) for batch in x0.split(cfg.bpd_batch_size)
    ]
    terms = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    protocol = {"n_images": int(x0.shape[0]), "split": "val", "variance": variance,
                "T": process.T, "method": "variational bound (Ho et al. 2020, Eq. 5)"}  # fmt: skip
    means = {k: float(v.mean()) for k, v in terms.items() if k != "total"}
    return float(terms["total"].mean()), protocol, means


def log_results(cfg: DictConfig, result: dict) -> None:
    """Send the numbers (and the protocol, as hyperparameters) to the configured loggers."""
    for logger in build_loggers(cfg.get("logger")):
        logger.log_hyperparams({"protocol": result["protocol"], "ckpt": result["ckpt"]})
        logger.log_metrics({f"eval/{k}": v for k, v in result.items() if isinstance(v, float)})
        logger.finalize("success")


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        result = run(cfg)
    shown = {k: round(v, 4) for k, v in result.items() if isinstance(v, float)}
    print(f"{shown} -> {Path(cfg.out_dir) / 'metrics.json'}")


if __name__ == "__main__":
    main()
