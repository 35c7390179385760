"""Every config composes and instantiates; bad input fails at start-up with a clear message."""

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import open_dict

from diffusion.config import build, check_config
from diffusion.errors import ConfigError, UserError
from diffusion.train import train

from conftest import TINY, compose_train, run_cli
from datafiles import write_cifar10, write_mnist

GPUS = torch.cuda.device_count()
CONF = Path(__file__).resolve().parents[1] / "diffusion" / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_conf_at_top_level_is_the_shipped_package_config():
    top = Path(__file__).resolve().parents[1] / "conf"
    assert top.resolve() == CONF.resolve()


@pytest.mark.parametrize(
    "group",
    ["data", "model", "schedule", "sampler", "process", "loss_weight", "trainer", "logger",
     "callbacks", "text_encoder"],
)
def test_every_option_of_every_group_composes_checks_and_instantiates(group, tmp_path):
    required = {"image_folder": ["data.root=x"], "webdataset": ["data.urls='x-{0..1}.tar'"]}
    for option in options(group):
        overrides = [f"{group}={option}", *(required.get(option, []) if group == "data" else [])]
        if group == "model":
            overrides.append("data=cifar10")
        cfg = compose_train(overrides, tmp_path)
        if group == "trainer" and cfg.trainer.accelerator == "gpu" and not GPUS:
            with pytest.raises(ConfigError, match="this machine has no GPU"):
                check_config(cfg)
            continue
        check_config(cfg)
        node = cfg[group]
        if group == "trainer":
            if cfg.trainer.accelerator == "gpu":
                continue  # no GPU here; the config itself was composed and checked above
            build(node, "trainer", logger=False)
        elif group in ("logger", "callbacks"):
            for name, sub in node.items():
                if "Wandb" in sub._target_:
                    continue  # instantiating it starts a run; covered by test_train
                built = build(sub, f"{group}.{name}")
                assert type(built).__name__ == sub._target_.rsplit(".", 1)[-1]
        elif group in ("schedule",):
            beta = instantiate(node)(cfg.T)
            assert beta.shape == (cfg.T,)
        elif group == "text_encoder" and option != "bytes":
            continue  # a hub model: built from a saved folder in test_text.py
        else:
            built = build(node, group)
            target = node._target_.rsplit(".", 1)[-1]
            named = {type(built).__name__, getattr(getattr(built, "func", None), "__name__", "")}
            assert target in named or (  # a _partial_ config builds a functools.partial
                group == "process" and built.family == option  # a factory: process=ddpm
            )


def test_every_schedule_option_is_a_function_in_the_schedules_module():
    from diffusion.processes import schedules

    assert options("schedule") == ["cosine", "linear", "quadratic", "sigmoid"]
    for name in options("schedule"):
        assert callable(getattr(schedules, name))


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            lambda c: c.model.__setitem__("widht", 64),
            r"model: unknown key\(s\) \['widht'\] for diffusion.nn.UNet; allowed: .*width",
        ),
        (lambda c: c.data.__setitem__("batchsize", 4), r"data: unknown key\(s\) \['batchsize'\]"),
        (
            lambda c: c.__setitem__("optimiser", {}),
            r"unknown key\(s\) \['optimiser'\] for python -m diffusion.train",
        ),
        (lambda c: c.__setitem__("T", 0), r"T=0 is invalid"),
        (lambda c: c.__setitem__("T", 2.5), r"T=2.5 is invalid"),
        (lambda c: c.optimizer.__setitem__("lr", -1e-3), r"optimizer.lr=-0.001 is invalid"),
        (lambda c: c.module.__setitem__("ema_decay", 1.0), r"module.ema_decay=1.0 is invalid"),
        (lambda c: c.module.__setitem__("ema_decay", "abc"), r"module.ema_decay='abc' is invalid"),
        (lambda c: c.optimizer.__setitem__("lr", "abc"), r"optimizer.lr='abc' is invalid"),
        (lambda c: c.trainer.__setitem__("max_steps", "abc"), r"trainer.max_steps='abc' is inv"),
        (lambda c: c.trainer.__setitem__("accumulate_grad_batches", 0), r"must be an integer >= 1"),
        (lambda c: c.trainer.__setitem__("val_check_interval", -2), r"val_check_interval=-2 is"),
        (lambda c: c.module.__setitem__("warmup_steps", -5), r"warmup_steps=-5 is invalid"),
        (
            lambda c: c.__setitem__("optimize_metric", "val/fdi"),
            r"optimize_metric='val/fdi' is invalid: choose one of \['val/loss', 'val/fid'",
        ),
        (lambda c: c.__setitem__("optimize_metric", "val/fid"), r"set callbacks.fid.every_n_steps"),
    ],
)
def test_check_config_names_the_key_and_what_is_allowed(edit, message):
    cfg = compose_train([])
    with open_dict(cfg):
        edit(cfg)
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)


@pytest.mark.parametrize(
    "trainer,gpus,message",
    [
        (["trainer=gpu", "trainer.devices=4"], 2, r"devices=4 asks for 4 .* has 2 GPU\(s\)"),
        (["trainer=gpu", "trainer.devices=[0,2]"], 2, r"devices=\[0, 2\] asks for 2 .* 2 GPU"),
        (["trainer=ddp", "trainer.devices='0,1,2'"], 2, r"asks for 3 device\(s\)"),
        (["trainer=gpu"], 0, r"accelerator=gpu but this machine has no GPU\(s\); use trainer=cpu"),
        (["trainer=gpu", "trainer.devices=2"], 2, None),
        (["trainer=ddp"], 2, None),  # devices=-1: all of them
    ],
)
def test_devices_beyond_the_machine_are_rejected(trainer, gpus, message, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    cfg = compose_train(trainer)
    if message is None:
        check_config(cfg)
    else:
        with pytest.raises(ConfigError, match=message):
            check_config(cfg)


def test_constructor_errors_become_config_errors_with_the_path():
    cfg = compose_train(["data.image_size=30"])
    with pytest.raises(ConfigError, match=r"module: image_size=30 is not divisible by 4.*28 or 32"):
        build(cfg.module, "module")
    cfg = compose_train(["data.batch_size=0"])
    with pytest.raises(ConfigError, match="data.batch_size must be an integer >= 1"):
        build(cfg.data, "data")


@pytest.mark.parametrize(
    "args,message",
    [
        (["schedule=cosin"], "Could not find 'schedule/cosin'"),
        (["model.widht=64"], "Could not override 'model.widht'"),
        (["+model.widht=64"], "unknown key(s) ['widht'] for diffusion.nn.UNet"),
        (["T=0"], "T=0 is invalid"),
        (["T=abc"], "T='abc' is invalid"),
        (["data.batch_size=abc"], "data.batch_size must be an integer >= 1, got 'abc'"),
        (["schedule.beta_end=2"], "need 0 < beta_start <= beta_end < 1, got beta_start=0.0001"),
        (["optimizer.lr=-1"], "optimizer.lr=-1 is invalid"),
        (["data.image_size=30"], "use a multiple of 4 such as 28 or 32"),
        (["data=image_folder", "data.root=/nonexistent/images"], "is not a folder"),
        (["model.in_channels=3"], "model.in_channels=3 does not match data.channels=1"),
        (["model.image_size=32"], "model.image_size=32 does not match data.image_size=16"),
        (
            ["trainer.accelerator=cpu", "trainer.devices=4096"],
            "trainer.devices=4096 asks for 4096 device(s) but this machine has",
        ),
    ],
)
def test_bad_input_is_rejected_at_start_up_with_the_key(args, message, tmp_path):
    """In-process: what the command line would print, before anything is written (composition
    errors are Hydra's own, which it prints without a traceback)."""
    from hydra.errors import HydraException

    with pytest.raises((UserError, HydraException)) as info:
        train(compose_train([*args, "trainer.max_steps=1"], tmp_path / "run"))
    assert message in str(info.value), str(info.value)
    assert not (tmp_path / "run").exists()
    if args[0] == "schedule=cosin":
        assert "cosine" in str(info.value)  # Hydra lists the available options


@pytest.mark.parametrize(
    "args,message",
    [(["schedule=cosin"], "Could not find 'schedule/cosin'"), (["T=abc"], "T='abc' is invalid")],
)
def test_cli_rejects_bad_input_in_seconds_without_a_traceback(args, message, tmp_path):
    """Two real processes: Hydra's composition error and ours, each without a traceback."""
    proc = run_cli([*args, "trainer.max_steps=1"], cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes_checks_and_builds(experiment, tmp_path):
    cfg = compose_train([f"experiment={experiment}"], tmp_path)
    check_config(cfg)
    module = build(cfg.module, "module")
    assert module.process.family == experiment.split("_mnist")[0].split("_cifar10")[0] or (
        experiment == "schedule_sweep" and module.process.family == "ddpm"
    )
    assert build(cfg.data, "data").batch_size == cfg.data.batch_size


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_trains_a_few_steps_with_a_tiny_model(experiment, tmp_path):
    """The experiment's own data format, family, sampler and callbacks (FID without weights
    switches itself off after checking its sampler suits the family)."""
    cfg = compose_train([f"experiment={experiment}"])
    dataset = cfg.data.get("dataset")  # None: the bundled digits
    if dataset is not None:
        (write_cifar10 if dataset == "cifar10" else write_mnist)(tmp_path / "data")
    cheap = {
        "euler_maruyama": ["sampler.steps=5"],
        "predictor_corrector": ["sampler.steps=3"],
        "annealed_langevin": ["sampler.steps_per_level=1"],
    }.get(cfg.sampler._target_.rsplit(".", 1)[-1], ["sampler.steps=5"])
    overrides = [
        f"experiment={experiment}", *TINY, "trainer.max_steps=2", "data.batch_size=4",
        *([f"data.root={tmp_path / 'data'}"] if dataset else []),
        "model.attention_levels=[1]", "model.dropout=0.0",
        f"callbacks.fid.extractor.weights_path={tmp_path / 'no-weights.pth'}", *cheap,
    ]  # fmt: skip
    fid_sampler = cfg.callbacks.fid.get("sampler") or {}
    if "steps" in fid_sampler:  # the experiment's FID sampler, checked at start-up, fits T=20
        overrides.append("callbacks.fid.sampler.steps=5")
    if cfg.sampler._target_.endswith("ddpm_ancestral"):
        overrides.remove("sampler.steps=5")
    val_loss = train(compose_train(overrides, tmp_path / "run"))
    assert val_loss is not None and math.isfinite(val_loss) and val_loss > 0
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_ddpm_cifar10_experiment_is_the_papers_setup():
    cfg = compose_train(["experiment=ddpm_cifar10"])
    assert cfg.model.width == 128 and list(cfg.model.channel_mult) == [1, 2, 2, 2]
    assert cfg.T == 1000 and cfg.schedule._target_.endswith(".linear")
    assert cfg.optimizer.lr == 2e-4 and cfg.data.batch_size == 128 and cfg.data.hflip
    assert cfg.module.warmup_steps == 5000 and cfg.module.ema_decay == 0.9999
    assert cfg.trainer.gradient_clip_val == 1.0 and cfg.trainer.max_steps == 800_000
