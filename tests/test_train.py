"""The real entry point trains a few steps on every data config that can run offline."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from diffusion.errors import DataError
from diffusion.processes import schedules
from diffusion.train import train
from diffusion.training.data import TorchvisionDataModule
from diffusion.training.module import DiffusionModule

from conftest import compose_train, run_cli
from datafiles import write_cifar10, write_image_folder, write_mnist


def run_train(overrides: list[str], out: Path) -> float | None:
    return train(compose_train(overrides, out))


def assert_run_artifacts(
    out: Path, n: int = 4, channels: int = 1, size: int = 16
) -> DiffusionModule:
    assert (out / "config.yaml").is_file()
    assert (out / "checkpoints" / "last.ckpt").is_file()
    grid = out / "samples" / "final.png"
    assert grid.is_file() and (out / "samples" / "step_000002.png").is_file()
    assert (out / "samples" / "denoise_final.png").is_file()
    assert (out / "plots" / "schedule.png").is_file()
    with Image.open(grid) as img:
        # a 2×2 grid of `size` images with 1-pixel padding, upscaled by an integer factor to at
        # least 512 pixels for viewing
        side = 2 * size + 3
        factor = -(-512 // side)
        assert img.size == (factor * side, factor * side) and factor * side >= 512
    module = DiffusionModule.load_from_checkpoint(
        out / "checkpoints" / "last.ckpt", map_location="cpu"
    )
    images = module.sample(n, generator=torch.Generator().manual_seed(0))
    assert images.shape == (n, channels, size, size) and torch.isfinite(images).all()
    return module


def test_digits_trains_checkpoints_samples_and_reloads(tiny, tmp_path):
    val_loss = run_train([*tiny, "schedule=cosine"], tmp_path)
    assert val_loss is not None and 0 < val_loss < 10
    module = assert_run_artifacts(tmp_path)
    ckpt = torch.load(
        tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    assert ckpt["beta"].dtype == torch.float64
    assert torch.equal(ckpt["beta"], schedules.cosine(20))
    assert ckpt["global_step"] == 4
    assert int(module.ema.num_updates) == 4
    # the EMA weights moved away from the initial copy, and differ from the raw weights
    assert not torch.equal(module.ema.module.input_conv.weight, module.net.input_conv.weight)
    assert any(p.name.startswith("step_") for p in (tmp_path / "checkpoints").iterdir())


def test_image_folder_with_a_corrupt_file(tiny, tmp_path, caplog):
    root = write_image_folder(tmp_path / "images")
    with caplog.at_level(logging.WARNING):
        run_train(
            [*tiny, "data=image_folder", f"data.root={root}", "data.image_size=16",
             "data.channels=3", "data.val_fraction=0.2"],
            tmp_path / "run",
        )  # fmt: skip
    assert_run_artifacts(tmp_path / "run", channels=3)


def test_image_folder_corrupt_file_as_error(tiny, tmp_path):
    root = write_image_folder(tmp_path / "images", n=2)
    with pytest.raises(DataError, match="broken.png"):
        run_train(
            [*tiny, "data=image_folder", f"data.root={root}", "data.image_size=16",
             "data.channels=1", "data.on_corrupt=error", "data.val_fraction=0.4"],
            tmp_path / "run",
        )  # fmt: skip


def test_empty_image_folder_is_a_clear_error(tiny, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        run_train([*tiny, "data=image_folder", f"data.root={tmp_path / 'empty'}"], tmp_path / "run")


@pytest.mark.parametrize("dataset,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_format_files(tiny, tmp_path, dataset, folder):
    write_mnist(tmp_path / "data", folder)
    run_train(
        [*tiny, f"data={dataset}", f"data.root={tmp_path / 'data'}", "data.image_size=16"],
        tmp_path / "run",
    )
    assert_run_artifacts(tmp_path / "run")


def test_cifar10_format_files(tiny, tmp_path):
    write_cifar10(tmp_path / "data")
    run_train([*tiny, "data=cifar10", f"data.root={tmp_path / 'data'}"], tmp_path / "run")
    assert_run_artifacts(tmp_path / "run", channels=3, size=32)


def test_missing_dataset_offline_says_where_to_put_the_files(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise RuntimeError(
            "Error downloading train-images-idx3-ubyte.gz: <urlopen error [Errno -3]>"
        )

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    dm = TorchvisionDataModule("mnist", str(tmp_path), image_size=28, channels=1)
    with pytest.raises(DataError) as err:
        dm.prepare_data()
    message = str(err.value)
    assert str(tmp_path / "MNIST" / "raw") in message and "train-images-idx3-ubyte" in message


def test_tensorboard_logger_writes_events(tiny, tmp_path):
    run_train([*tiny, "logger=tensorboard"], tmp_path)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_no_logger_still_writes_checkpoints_and_grids(tiny, tmp_path):
    run_train([*tiny, "logger=none"], tmp_path)
    assert_run_artifacts(tmp_path)
    assert not (tmp_path / "csv").exists()


def test_cli_quickstart_entry_point(tiny, tmp_path):
    """The real command: its files, its closing line, and none of the libraries' noise a user
    cannot act on."""
    proc = run_cli(tiny, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "outputs" / "runs").iterdir())
    assert len(runs) == 1
    assert (runs[0] / "samples" / "final.png").is_file()
    assert (runs[0] / "checkpoints" / "last.ckpt").is_file()
    assert (runs[0] / "csv" / "metrics.csv").is_file()
    printed = proc.stdout + proc.stderr
    for noise in ("weights_only", "LeafSpec", "Tip:", "Total FLOPs"):
        assert noise not in printed, noise
    assert "done in" in printed


def test_cli_multirun_over_two_schedules_named_in_wandb_and_reported(
    tiny, tmp_path, monkeypatch, capsys
):
    env = {"HOME": str(tmp_path), "WANDB_MODE": "offline"}
    proc = run_cli(["-m", "schedule=linear,cosine", *tiny, "logger=wandb"], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweeps = list((tmp_path / "outputs" / "multiruns").iterdir())
    assert len(sweeps) == 1
    runs = sorted(p for p in sweeps[0].iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in runs] == ["0", "1"]
    schedules_used = []
    for run in runs:
        assert (run / "checkpoints" / "last.ckpt").is_file()
        schedules_used.append(
            (run / "config.yaml").read_text().split("diffusion.processes.schedules.")[1].split()[0]
        )
    assert schedules_used == ["linear", "cosine"]
    # one W&B group for the sweep, one run per point named by its overrides
    configs = [yaml.safe_load((run / "config.yaml").read_text()) for run in runs]
    groups = {c["logger"]["wandb"]["group"] for c in configs}
    assert groups == {f"sweep-{sweeps[0].name}"}
    assert ["schedule=linear" in c["logger"]["wandb"]["name"] for c in configs] == [True, False]
    assert "schedule=cosine" in configs[1]["logger"]["wandb"]["name"]
    assert len(list(runs[0].glob("wandb/offline-run-*"))) == 1
    # the report: swept values and final metrics per point
    from diffusion.report import main as report  # in-process: the sweep above was the real CLI

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    report([str(sweeps[0]), "--wandb"])
    printed = capsys.readouterr().out
    rows = list(csv.DictReader((sweeps[0] / "report.csv").open()))
    assert [r["schedule"] for r in rows] == ["linear", "cosine"]
    for row, run in zip(rows, runs, strict=True):
        result = json.loads((run / "result.json").read_text())
        assert float(row["val/loss"]) == pytest.approx(result["metrics"]["val/loss"])
        assert row["status"] == "done" and int(row["global_step"]) == 4
    assert "| 0 | linear |" in printed and (sweeps[0] / "report.png").is_file()
    assert len(list(sweeps[0].glob("wandb/offline-run-*"))) == 1  # the table went to W&B too


@pytest.mark.parametrize(
    "argv,message",
    [(["{tmp}"], "error: no runs in"), (["{tmp}/missing"], "error: no runs in"),
     (["{tmp}", "--wandbb"], "unrecognized arguments: --wandbb"), ([], "required: sweep_dir")],
)  # fmt: skip
def test_report_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, capsys):
    from diffusion.report import main

    with pytest.raises(SystemExit) as info:
        main([a.format(tmp=tmp_path) for a in argv])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_cli_wandb_offline_without_credentials(tiny, tmp_path):
    env = {"HOME": str(tmp_path), "WANDB_MODE": "", "WANDB_API_KEY": ""}
    proc = run_cli([*tiny, "logger=wandb"], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = next((tmp_path / "outputs" / "runs").iterdir())
    offline_runs = list((run / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    assert list(offline_runs[0].glob("*.wandb"))
    # the sample grids went to W&B as images
    for key in ("samples", "denoising", "schedule"):
        assert list(offline_runs[0].glob(f"files/media/images/{key}_*.png")), key


def test_fid_callback_logs_val_fid(tiny, tmp_path):
    run_train(
        [*tiny, "callbacks.fid.every_n_steps=2", "callbacks.fid.n=12", "callbacks.fid.batch_size=8",
         "callbacks.fid.reference_n=40",
         "+callbacks.fid.sampler={_target_:diffusion.samplers.ddim,_partial_:true,steps:3}",
         "callbacks.fid.extractor._target_=test_metrics.SmallFeatures",
         f"callbacks.fid.cache_dir={tmp_path / 'cache'}"],
        tmp_path,
    )  # fmt: skip
    rows = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    values = {r.split(",")[header.index("val/fid")] for r in rows[1:]} - {""}
    assert len(values) == 2 and all(float(v) > 0 for v in values)  # after steps 2 and 4
    assert "val/kid" in header
    assert len(list((tmp_path / "cache").glob("ref_*.pt"))) == 1  # reference features computed once


def test_fid_callback_turns_itself_off_without_inception_weights(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_hub"))
    overrides = [
        *tiny,
        "callbacks.fid.every_n_steps=2",
        f"callbacks.fid.extractor.weights_path={tmp_path / 'none.pth'}",
    ]
    with pytest.warns(UserWarning, match="FID callback off"):
        run_train(overrides, tmp_path)
    assert "val/fid" not in (tmp_path / "csv" / "metrics.csv").read_text()
