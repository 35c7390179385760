"""Class-conditional models end to end: labels from every data module, training with labels
dropped to the null class, labelled sampling with guidance, and the bad input around them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_sample import sample

from diffusion.checkpoints import load_module
from diffusion.errors import ConfigError, UserError
from diffusion.train import train
from diffusion.training.data import (
    DigitsDataModule,
    ImageFolderDataModule,
    TorchvisionDataModule,
)

from conftest import TINY, compose_train
from datafiles import write_cifar10, write_image_folder, write_mnist


def _labelled_batch(dm):
    dm.labels = True
    dm.setup()
    return next(iter(dm.val_dataloader()))


def test_every_data_module_yields_its_labels_and_names_its_classes(tmp_path):
    from sklearn.datasets import load_digits

    digits = DigitsDataModule(batch_size=4, val_fraction=0.5)
    assert digits.class_names() == [str(d) for d in range(10)]
    images, labels = _labelled_batch(digits)
    index = digits.val_set.indices[:4]  # the batch is the first validation images, in order
    assert labels.tolist() == [int(load_digits().target[i]) for i in index]
    assert images.dtype == torch.uint8 and images.shape == (4, 1, 16, 16)

    write_mnist(tmp_path / "data", "FashionMNIST")  # label of image j: j % 10
    fashion = TorchvisionDataModule("fashion_mnist", str(tmp_path / "data"), 28, 1, batch_size=4)
    assert fashion.class_names()[0] == "T-shirt/top" and len(fashion.class_names()) == 10
    _, labels = _labelled_batch(fashion)
    assert labels.tolist() == [j % 10 for j in fashion.val_set.indices[:4]]

    write_cifar10(tmp_path / "data")
    cifar = TorchvisionDataModule("cifar10", str(tmp_path / "data"), 32, 3, batch_size=4)
    assert cifar.class_names()[:2] == ["airplane", "automobile"]
    _, labels = _labelled_batch(cifar)
    assert labels.tolist() == [j % 10 for j in cifar.val_set.indices[:4]]

    root = write_image_folder(tmp_path / "images", corrupt=False)  # class_i/nested/img_j
    folder = ImageFolderDataModule(str(root), 16, 3, batch_size=12, val_fraction=0.5)
    assert folder.class_names() == ["class_0", "class_1", "class_2"]
    files = sorted(p for p in root.rglob("*") if p.is_file())
    _, labels = _labelled_batch(folder)
    expected = [int(files[i].relative_to(root).parts[0][-1]) for i in folder.val_set.indices]
    assert labels.tolist() == expected
    # images straight under the root: not the ImageFolder layout, no labels
    Image.new("RGB", (8, 8)).save(root / "loose.png")
    assert ImageFolderDataModule(str(root), 16, 3).class_names() is None
    # without labels a batch is the images alone, as before
    plain = DigitsDataModule(batch_size=4, val_fraction=0.5)
    plain.setup()
    assert isinstance(next(iter(plain.val_dataloader())), torch.Tensor)


def test_labels_are_dropped_to_the_null_class_at_the_configured_rate(tmp_path):
    from hydra.utils import instantiate

    seen = []
    module = instantiate(compose_train([*TINY, "model.num_classes=10"]).module)

    def net(inputs, label, y=None):
        seen.append(y.clone())
        return torch.zeros_like(inputs, requires_grad=True)

    module._compiled_forward = net
    labels = torch.arange(2000) % 10
    module.training_step((torch.zeros(2000, 1, 16, 16), labels), 0)
    (y,) = seen
    null = y == 10
    assert 0.085 < float(null.float().mean()) < 0.115  # p_uncond = 0.1; 2000 draws: sd 0.0067
    assert torch.equal(y[~null], labels[~null])  # the others keep their class
    module.hparams.cond_drop_prob = 0.0
    module.training_step((torch.zeros(2000, 1, 16, 16), labels), 1)
    assert torch.equal(seen[1], labels)


@pytest.fixture(scope="module")
def conditional_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("conditional")
    train(compose_train([*TINY, "model.num_classes=10", "trainer.max_steps=2"], out))
    return out / "checkpoints" / "last.ckpt"


def test_a_conditional_model_trains_keeps_its_class_names_and_samples_by_label(
    conditional_ckpt, tmp_path
):
    module = load_module(conditional_ckpt)
    assert module.num_classes == 10 and module.class_names == [str(d) for d in range(10)]
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    threes = module.sample(2, generator=g(), labels=[3, 3])
    sevens = module.sample(2, generator=g(), labels=[7, 7])
    assert not torch.equal(threes, sevens)  # the label reaches the network
    assert torch.equal(module.sample(2, generator=g(), labels=[3, 3], guidance=0.0), threes)
    assert not torch.equal(module.sample(2, generator=g(), labels=[3, 3], guidance=2.0), threes)
    unconditional = module.sample(2, generator=g())  # the null class
    assert not torch.equal(unconditional, threes)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        module.sample(1, labels=[10])
    with pytest.raises(ValueError, match="1 labels for 2 images"):
        module.sample(2, labels=[1])
    # the entry point: n per class, one row per class, labels saved with the samples
    info = sample([f"ckpt={conditional_ckpt}", "labels=all", "n=2", "guidance=1.5",
                   "sampler=ddim", "sampler.steps=3"], tmp_path)  # fmt: skip
    assert info["n"] == 20 and info["labels"] == [c for c in range(10) for _ in range(2)]
    saved = np.load(tmp_path / "samples.npz")
    assert saved["images"].shape == (20, 16, 16, 1) and saved["labels"].tolist() == info["labels"]
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size[1] > 10 * 0.9 * 100 * 0.9  # ten labelled rows of 0.9 inch at 100 dpi


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["labels=[3,12]"], r"labels=\[3, 12\] is invalid: \[12\] outside this checkpoint's "
                            r"classes 0..9 \(0=0, 1=1"),
        (["guidance=2"], "guidance=2 needs labels="),
        (["labels=[-1]"], "labels=[-1] is invalid: give all"),
        (["guidance=-1", "labels=[1]"], "guidance=-1 is invalid: it must be >= 0"),
    ],
)  # fmt: skip
def test_bad_labels_for_a_conditional_checkpoint(conditional_ckpt, overrides, message, tmp_path):
    with pytest.raises(UserError, match=message.replace("[-1]", r"\[-1\]")):
        sample([f"ckpt={conditional_ckpt}", *overrides], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "overrides,message",
    [(["labels=[1,2]"], r"labels=\[1, 2\] needs a class-conditional checkpoint"),
     (["guidance=1"], "guidance=1 needs a class-conditional checkpoint")],
)  # fmt: skip
def test_labels_or_guidance_for_an_unconditional_checkpoint(
    tiny_ckpt, overrides, message, tmp_path
):
    with pytest.raises(ConfigError, match=message):
        sample([f"ckpt={tiny_ckpt}", *overrides], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_conditional_training_needs_labelled_data_with_as_many_classes(tmp_path):
    root = write_image_folder(tmp_path / "images", corrupt=False)
    Image.new("RGB", (8, 8)).save(root / "loose.png")  # not one folder per class
    flat = ["data=image_folder", f"data.root={root}", "data.image_size=16", "data.channels=1"]
    with pytest.raises(ConfigError, match="model.num_classes=3 asks for a class-conditional "
                                          "model, but this data has no labels"):  # fmt: skip
        train(compose_train([*TINY, *flat, "model.num_classes=3"], tmp_path / "a"))
    with pytest.raises(ConfigError, match=r"model.num_classes=3 does not match the data's 10 "
                                          r"classes \(0, 1, 2"):  # fmt: skip
        train(compose_train([*TINY, "model.num_classes=3"], tmp_path / "b"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_resuming_with_another_number_of_classes_is_refused(conditional_ckpt, tmp_path):
    with pytest.raises(UserError, match="model.num_classes: checkpoint 10, config 0"):
        train(compose_train([*TINY, f"ckpt_path={conditional_ckpt}"], tmp_path / "r"))


def test_balanced_labels_and_the_training_callbacks_of_a_conditional_model(tmp_path):
    from diffusion.evaluation.draw import balanced_labels

    assert balanced_labels(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert balanced_labels(7, 3, grouped=True).tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert balanced_labels(7, 0) is None
    fid = ["every_n_steps=2", "n=10", "batch_size=10", "reference_n=20",
           "extractor._target_=test_metrics.SmallFeatures", f"cache_dir={tmp_path / 'cache'}"]
    fid = [f"callbacks.fid.{o}" for o in fid]
    fid.append("+callbacks.fid.sampler={_target_:diffusion.samplers.ddim,_partial_:true,steps:2}")
    train(compose_train([*TINY, "model.num_classes=10", "trainer.max_steps=2",
                         "callbacks.sample_grid.n=10", *fid], tmp_path))  # fmt: skip
    header, *rows = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()
    column = header.split(",").index("val/fid")
    assert any(r.split(",")[column] for r in rows)  # the FID of class-balanced samples
    with Image.open(tmp_path / "samples" / "step_000002.png") as grid:
        assert grid.size[1] > 10 * 0.9 * 100 * 0.9  # one labelled row per class


def test_the_class_accuracy_classifier_learns_the_classes_and_a_shuffled_control_does_not():
    from diffusion.evaluation.classifier import accuracy, fit

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(400) % 2  # class 0: a bright left half, class 1: a bright right half
    images = (torch.rand(400, 1, 8, 8, generator=g) * 60).to(torch.uint8)
    images[labels == 0, :, :, :4] += 150
    images[labels == 1, :, :, 4:] += 150
    model = fit(images[:300], labels[:300], 2)
    assert accuracy(model, images[300:], labels[300:]) > 0.95
    assert accuracy(model, images[300:], 1 - labels[300:]) < 0.05  # the labels matter


def test_evaluate_a_conditional_checkpoint_class_balanced_with_class_accuracy(
    conditional_ckpt, tmp_path
):
    from test_evaluate import evaluate, small_features

    overrides = [f"ckpt={conditional_ckpt}", "metrics=[fid,class_acc]", "n=20", "batch_size=20",
                 "reference_n=40", "guidance=1.5", "sampler=ddim", "sampler.steps=2"]  # fmt: skip
    result = evaluate(overrides, tmp_path, feature_extractor=small_features)
    protocol = result["protocol"]
    assert protocol["labels"] == "class-balanced" and protocol["guidance"] == 1.5
    assert 0.0 <= result["class_acc"] <= 1.0 and result["fid"] > 0
    held_out = protocol["class_acc"]["classifier_val_accuracy"]
    assert 0.0 <= held_out <= 1.0
    cached = list((tmp_path / "cache").glob("classifier_*.pt"))
    assert len(cached) == 1
    again = evaluate(overrides, tmp_path, feature_extractor=small_features)  # the cached one
    assert again["protocol"]["class_acc"]["classifier_val_accuracy"] == held_out
    assert again["class_acc"] == result["class_acc"]


@pytest.mark.parametrize(
    "overrides,message",
    [(["metrics=[class_acc]"], r"metrics=\[class_acc\] needs a class-conditional checkpoint"),
     (["metrics=[fid]", "guidance=2"], "guidance=2 needs a class-conditional checkpoint")],
)  # fmt: skip
def test_class_accuracy_or_guidance_of_an_unconditional_checkpoint(
    tiny_ckpt, overrides, message, tmp_path
):
    from test_evaluate import evaluate

    with pytest.raises(ConfigError, match=message):
        evaluate([f"ckpt={tiny_ckpt}", *overrides], tmp_path / "out")
    assert not (tmp_path / "out" / "metrics.json").exists()
