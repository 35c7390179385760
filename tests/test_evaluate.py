"""``python -m diffusion.evaluate`` end to end on a checkpoint trained for a few steps."""

from __future__ import annotations

import json
import math

import pytest
from hydra import compose, initialize_config_module
from test_metrics import NET

from diffusion.errors import ConfigError
from diffusion.evaluate import run
from diffusion.train import train

from conftest import TINY, compose_train


def small_features(x):
    return {"pool": NET(x)}


@pytest.fixture
def ckpt(tiny_ckpt):
    return tiny_ckpt  # the session's shared tiny checkpoint (conftest)


def evaluate(overrides: list[str], out, **kwargs) -> dict:
    with initialize_config_module("diffusion.conf", version_base="1.3"):
        cfg = compose(
            "evaluate", overrides=[*overrides, f"out_dir={out}", f"cache_dir={out}/cache"]
        )
    return run(cfg, **kwargs)


def test_fid_kid_bpd_with_protocol_in_metrics_json(ckpt, tmp_path):
    result = evaluate(
        [f"ckpt={ckpt}", "n=40", "batch_size=20", "metrics=[fid,kid,bpd]", "sampler=ddim",
         "sampler.steps=4", "reference_n=100", "kid_subset_size=30", "kid_subsets=5", "bpd_n=6"],
        tmp_path, feature_extractor=small_features,
    )  # fmt: skip
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == result
    assert result["fid"] > 0 and math.isfinite(result["kid"]) and result["kid_std"] >= 0
    assert math.isfinite(result["bpd"]) and result["bpd"] > 0  # an untrained model: any bound
    protocol = result["protocol"]
    assert protocol["n_samples"] == 40 and protocol["nfe"] == 4 and protocol["seed"] == 0
    assert protocol["reference"] == {
        "dataset": "DigitsDataModule",
        "split": "train",
        "n": 100,
        "image_size": 16,
    }
    assert protocol["sampler"]["_target_"] == "diffusion.samplers.chain.ddim"
    assert protocol["bpd"]["n_images"] == 6 and protocol["bpd"]["T"] == 20
    assert set(result["bpd_terms"]) == {"prior", "vb", "decoder"}
    # the reference features were cached: a second evaluation reads them
    assert len(list((tmp_path / "cache").glob("ref_*.pt"))) == 1
    again = evaluate(
        [f"ckpt={ckpt}", "n=40", "batch_size=20", "metrics=[fid]", "sampler=ddim",
         "sampler.steps=4", "reference_n=100"],
        tmp_path, feature_extractor=small_features,
    )  # fmt: skip
    assert again["fid"] == pytest.approx(result["fid"], rel=1e-9)


def test_inception_score_needs_logits(ckpt, tmp_path):
    from diffusion.errors import ConfigError

    with pytest.raises(ConfigError, match="no Inception Score"):
        evaluate(
            [f"ckpt={ckpt}", "n=4", "metrics=[is]", "reference_n=10"],
            tmp_path,
            feature_extractor=small_features,
        )


def test_bad_input(ckpt, tmp_path):
    from diffusion.errors import ConfigError

    with pytest.raises(ConfigError, match=r"unknown metric\(s\) \['fdi'\]"):
        evaluate([f"ckpt={ckpt}", "metrics=[fdi]"], tmp_path)
    with pytest.raises(ConfigError, match="which checkpoint. give ckpt="):
        evaluate([], tmp_path)


@pytest.mark.parametrize("process", ["vp_sde", "edm", "ncsn"])
def test_bpd_of_continuous_families_through_the_probability_flow_ode(process, tmp_path):
    out = tmp_path / "run"
    extra = ["sampler.steps=4"] if process != "ncsn" else ["sampler.steps_per_level=1"]
    train(compose_train([*TINY, "trainer.max_steps=2", f"process={process}", *extra], out))
    ckpt = out / "checkpoints" / "last.ckpt"
    overrides = [f"ckpt={ckpt}", "metrics=[bpd]", "bpd_n=4", "bpd_batch_size=4"]
    if process == "ncsn":
        with pytest.raises(ConfigError, match="bpd needs a likelihood.*process=ncsn has neither"):
            evaluate(overrides, tmp_path / "eval")
        return
    result = evaluate(overrides, tmp_path / "eval")
    assert 0 < result["bpd"] < 40 and "probability-flow ODE" in result["protocol"]["bpd"]["method"]
    assert result["protocol"]["bpd"]["nfe_mean"] > 10
