"""One standard for every entry point: each top-level key is declared, and a wrong type or an
out-of-range value of any of them is one clear line naming the key (a UserError, which the
entry point prints without a traceback, exit status 2), before anything is written."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module
from omegaconf import open_dict

from diffusion import evaluate, export, sample, visualize
from diffusion.config import TRAIN_FIELDS, Field
from diffusion.errors import UserError
from diffusion.train import train

from conftest import TINY, compose_train, run_cli


def bad_values(field: Field) -> list:
    """A wrong type and, where the key has a range or a set of options, a value outside it."""
    wrong_type = {"int": "abc", "float": "abc", "bool": "maybe", "str": 12, "choice": 3,
                  "file": 3, "checkpoint": 3, "dir": 3, "device": 3, "list": "abc", "node": "abc",
                  "labels": "abc"}  # fmt: skip
    out = [wrong_type[field.kind]]
    if field.kind in ("int", "float") and field.minimum is not None:
        out.append(field.minimum - 1)
    if field.kind == "choice":
        out.append("bogus")
    if field.kind in ("file", "checkpoint"):
        out.append("/nonexistent/file.ckpt")
    if field.kind == "dir":
        out.append("/proc/no/such/folder")
    if field.kind == "device":
        out.append("gpu0")
    if field.kind == "list":
        out.append(["bogus"] if field.choices else [-5] if field.minimum is not None else None)
    if field.kind == "labels":
        out.append([-5])
    return [v for v in out if v is not None]


def compose_entry(name: str, overrides: list[str]):
    with initialize_config_module("diffusion.conf", version_base="1.3"):
        return compose(name, overrides=overrides)


def cases():
    entries = {
        "train": (TRAIN_FIELDS, None),
        "sample": (sample.FIELDS, sample.run),
        "evaluate": (evaluate.FIELDS, evaluate.run),
        "visualize": (visualize.FIELDS, visualize.visualize),
        "export": (export.FIELDS, export.run),
    }
    for entry, (fields, _) in entries.items():
        for key, field in fields.items():
            for value in bad_values(field):
                yield pytest.param(entry, key, value, id=f"{entry}-{key}={value!r}")


def base(entry: str, tiny_ckpt, tmp_path):
    out = [f"out_dir={tmp_path / 'out'}"]
    if entry == "train":
        return compose_train(TINY, tmp_path / "out")
    if entry == "sample":
        return compose_entry("sample", [f"ckpt={tiny_ckpt}", "n=2", "batch_size=2", *out])
    if entry == "evaluate":
        return compose_entry("evaluate", [f"ckpt={tiny_ckpt}", "metrics=[bpd]", "bpd_n=1",
                                          f"cache_dir={tmp_path / 'cache'}", *out])  # fmt: skip
    if entry == "export":
        return compose_entry("export", [f"ckpt={tiny_ckpt}", f"out={tmp_path / 'out'}"])
    return compose_entry("visualize", ["mode=schedules", "T=20", *out])


RUN = {"train": train, "sample": sample.run, "evaluate": evaluate.run,
       "visualize": visualize.visualize, "export": export.run}  # fmt: skip


@pytest.mark.parametrize("entry,key,value", list(cases()))
def test_every_key_of_every_entry_point_rejects_bad_values_in_one_line(
    entry, key, value, tiny_ckpt, tmp_path
):
    cfg = base(entry, tiny_ckpt, tmp_path)
    if key not in cfg:
        pytest.skip(f"{key} is not in {entry}'s config")
    with open_dict(cfg):
        cfg[key] = value
    with pytest.raises(UserError) as info:
        RUN[entry](cfg)
    message = str(info.value)
    assert key in message or key.rstrip("s") in message, message
    assert "\n" not in message
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize("entry", ["train", "sample", "evaluate", "visualize", "export"])
def test_every_top_level_key_is_declared(entry, tiny_ckpt, tmp_path):
    """A key added to an entry point's YAML without a Field fails every run of it."""
    fields = {"train": TRAIN_FIELDS, "sample": sample.FIELDS, "evaluate": evaluate.FIELDS,
              "visualize": visualize.FIELDS, "export": export.FIELDS}[entry]  # fmt: skip
    cfg = base(entry, tiny_ckpt, tmp_path)
    assert set(cfg.keys()) - {"hydra"} <= set(fields)
    with open_dict(cfg):
        cfg["new_key"] = 1
    with pytest.raises(UserError, match=r"unknown key\(s\) \['new_key'\]"):
        RUN[entry](cfg)


def test_a_run_folder_that_cannot_be_created_is_one_line_and_exit_2(tmp_path):
    """A real process: Hydra makes the folder before our code runs (a callback checks first)."""
    proc = run_cli(["mode=schedules", "hydra.run.dir=/proc/no/such/folder"], cwd=tmp_path,
                   entry="diffusion.visualize")  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "hydra.run.dir='/proc/no/such/folder' cannot be created" in proc.stderr


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["sampler=ddim", "sampler.steps=5000"],
         r"sampler: steps must be an integer in \[1, T=20\], got 5000"),
        (["sampler=ddim", "sampler.eta=2"], r"sampler: eta must be in \[0, 1\], got 2"),
        (["sampler=ddim", "sampler.steps=5", "sampler.spacing=leading"],
         "sampler: spacing must be one of"),
        (["sampler=ddpm", "sampler.variance=large"], "sampler: variance must be 'beta' or"),
        (["model.num_heads=0"], "model.num_heads=0 and model.norm_groups=4 must be >= 1"),
    ],
)  # fmt: skip
def test_what_a_run_will_need_is_checked_before_its_first_step(overrides, message, tmp_path):
    """A sampler option that would fail at the first sample grid (hours into a real run), or a
    network size that would divide by zero, stops the run at start-up, nothing written."""
    from diffusion.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        train(compose_train([*TINY, *overrides], tmp_path / "out"))
    assert not (tmp_path / "out").exists()
