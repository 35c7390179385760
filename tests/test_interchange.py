"""Interchange with diffusers (diffusion.interchange, diffusion.export, ckpt=diffusers:…).

The U-Net maps weight for weight onto diffusers' UNet2DModel (same outputs to 1e-5, both ways),
an export runs in DDPMPipeline / DDIMPipeline and gives our samplers' images from the same noise,
export → import → export is byte-identical, and bad input is one line each. Skipped without the
``diffusers`` extra (CI installs it).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("safetensors")

from diffusers import (  # noqa: E402
    DDIMPipeline,
    DDPMPipeline,
    DDPMScheduler,
    EDMEulerScheduler,
    UNet2DModel,
)

from diffusion.checkpoints import load_module  # noqa: E402
from diffusion.errors import ConfigError, UserError  # noqa: E402
from diffusion.interchange import folder as F  # noqa: E402
from diffusion.interchange import scheduler as S  # noqa: E402
from diffusion.interchange import unet as U  # noqa: E402
from diffusion.processes import schedules  # noqa: E402
from diffusion.samplers.chain import ddim, ddpm_ancestral  # noqa: E402
from diffusion.training.module import DiffusionModule  # noqa: E402

NET = {
    "_target_": "diffusion.nn.UNet", "image_size": 8, "in_channels": 1, "width": 8,
    "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1], "norm_groups": 4,
}  # fmt: skip
# google/ddpm-cifar10-32's options (DDPM's TensorFlow code), on a tiny network.
DDPM_ORIGINAL = {
    "sample_size": 8, "in_channels": 3, "out_channels": 3, "block_out_channels": [16, 32],
    "layers_per_block": 1, "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 8, "norm_eps": 1e-6,
    "attention_head_dim": None, "flip_sin_to_cos": False, "freq_shift": 1,
    "downsample_padding": 0, "dropout": 0.1,
}  # fmt: skip


def randomize(net: torch.nn.Module, seed: int = 0) -> None:
    """Weights that make every layer matter (ours zero-initialise the last conv of each block)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def tiny_module(**module) -> DiffusionModule:
    net = {**NET, **module.pop("net", {})}
    m = DiffusionModule(
        net=net, schedule={"_target_": "diffusion.processes.schedules.linear", "_partial_": True},
        T=20, image_shape=[1, 8, 8], optimizer=F.DEFAULT_OPTIMIZER, **module,
    )  # fmt: skip
    randomize(m.net)
    m.ema.module.load_state_dict(m.net.state_dict())
    return m.eval()


def save_diffusers(tmp_path: Path, config: dict, scheduler: DDPMScheduler, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    unet = UNet2DModel(**config)
    randomize(unet, seed)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "pipe")
    return tmp_path / "pipe"


# ----- the U-Net --------------------------------------------------------------------------


@pytest.mark.parametrize("heads", [None, 8])
def test_import_gives_diffusers_outputs(tmp_path, heads):
    """A random UNet2DModel with DDPM's original options (sin-first embedding, freq_shift 1, SAME
    down-sampling padding, GroupNorm ε 1e-6), one head or several, saved with save_pretrained:
    our imported U-Net gives its outputs to 1e-5. Control: our default embedding does not."""
    config = {**DDPM_ORIGINAL, "attention_head_dim": heads, "block_out_channels": [32, 32]}
    folder = save_diffusers(tmp_path, config, DDPMScheduler(num_train_timesteps=50))
    unet = UNet2DModel.from_pretrained(folder / "unet").eval()
    module = load_module(f"diffusers:{folder}")
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 25, 49])
    with torch.no_grad():
        theirs = unet(x, t).sample
        ours = module.ema(x, t)
        assert (ours - theirs).abs().max() < 1e-5 < theirs.abs().mean()
        net = module.ema.module
        net.sin_first = False  # control: improved-diffusion's embedding layout
        assert (net(x, t) - theirs).abs().max() > 1e-2


def test_weight_names_round_trip():
    """Our names → diffusers' → ours is the identity on every weight, and diffusers' names are
    exactly UNet2DModel's (its state dict loads strictly)."""
    module = tiny_module(net={"num_classes": 3})
    ours = module.net.state_dict()
    theirs = U.to_diffusers(ours)
    config = U.unet_config(dict(module.hparams.net), module.net)
    unet = UNet2DModel(**{k: v for k, v in config.items() if k != "_class_name"})
    unet.load_state_dict(theirs, strict=True)
    back = U.from_diffusers(theirs)
    assert back.keys() == ours.keys()
    assert all(torch.equal(back[k], ours[k]) for k in ours)
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 5, 19]), torch.tensor([0, 2, 3])
    with torch.no_grad():
        assert (unet(x, t, class_labels=y).sample - module.net(x, t, y)).abs().max() < 1e-5
        control = unet(x, t, class_labels=torch.tensor([1, 2, 3])).sample  # other classes
        assert (control - module.net(x, t, y)).abs().max() > 1e-3


# ----- export -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prediction, learn_sigma, variance",
    [("eps", False, "beta"), ("v", False, "beta_tilde"), ("x0", True, "beta")],
)
def test_export_runs_in_ddpm_pipeline(tmp_path, prediction, learn_sigma, variance):
    """An exported module, loaded by DDPMPipeline.from_pretrained and run from the same noise
    (the same generator), gives our ancestral sampler's images to 1e-4, for ε, v and x̂_0 with
    σ² = β, β̃ and a learned variance. Control: the other fixed variance differs."""
    sampler = {"_target_": "diffusion.samplers.chain.ddpm_ancestral", "_partial_": True,
               "variance": variance, "clip_x0": True}  # fmt: skip
    module = tiny_module(prediction=prediction, learn_sigma=learn_sigma, sampler=sampler)
    F.export(module, tmp_path / "out", source="tiny")
    scheduler = json.loads((tmp_path / "out" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == S.PREDICTION_TYPES[prediction]
    assert scheduler["variance_type"] == (
        "learned_range" if learn_sigma else S.VARIANCE_TYPES[variance]
    )
    pipe = DDPMPipeline.from_pretrained(tmp_path / "out")
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=20,
                  output_type="np").images  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, 1, 8, 8, generator=gen)
    ours = ddpm_ancestral(module.predictor(), x_T, module.process, variance=variance,
                          clip_x0=True, generator=gen)  # fmt: skip
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(ours - images).max() < 1e-4
    if not learn_sigma:
        other = "beta_tilde" if variance == "beta" else "beta"
        gen = torch.Generator().manual_seed(0)
        x_T = torch.randn(2, 1, 8, 8, generator=gen)
        control = ddpm_ancestral(module.predictor(), x_T, module.process, variance=other,
                                 clip_x0=True, generator=gen)  # fmt: skip
        control = (control / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        assert abs(control - images).max() > 1e-3


def test_export_runs_in_ddim_pipeline(tmp_path):
    """DDIMPipeline.from_pretrained on the same folder, η = 0 over every step, gives our DDIM's
    images to 1e-4, with x̂_0 clipped and ε̂ recomputed from it (diffusers'
    use_clipped_model_output=True, our clip_x0); 10 steps as well."""
    module = tiny_module()
    F.export(module, tmp_path / "out")
    pipe = DDIMPipeline.from_pretrained(tmp_path / "out")
    for steps in (20, 10):
        images = pipe(batch_size=2, generator=torch.Generator().manual_seed(1), eta=0.0,
                      num_inference_steps=steps, use_clipped_model_output=True,
                      output_type="np").images  # fmt: skip
        x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
        ours = ddim(module.predictor(), x_T, module.process, steps=steps, clip_x0=True)
        ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        assert abs(ours - images).max() < 1e-4


def test_export_import_export_is_byte_identical(tmp_path):
    """export → import (ckpt=diffusers:) → export: the same weight file, byte for byte, and the
    same configs. Control: the raw weights (use_ema=false) of a module whose EMA differs."""
    module = tiny_module()
    F.export(module, tmp_path / "a")
    again = load_module(f"diffusers:{tmp_path / 'a'}")
    F.export(again, tmp_path / "b")
    for name in ("unet/diffusion_pytorch_model.safetensors", "unet/config.json",
                 "scheduler/scheduler_config.json", "model_index.json"):  # fmt: skip
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    randomize(module.net, seed=1)
    F.export(module, tmp_path / "raw", use_ema=False)
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "raw" / weights).read_bytes() != (tmp_path / "a" / weights).read_bytes()


def test_named_schedules_are_diffusers():
    """β of our linear, quadratic, cosine and sigmoid schedules at T = 1000 export as diffusers'
    named schedules, whose β (DDPMScheduler's own) equal ours to float32 precision; a β table
    that is none of them exports as trained_betas."""
    ours = {
        "linear": schedules.linear(1000), "scaled_linear": schedules.quadratic(1000),
        "squaredcos_cap_v2": schedules.cosine(1000), "sigmoid": schedules.sigmoid(1000),
    }  # fmt: skip
    for name, beta in ours.items():
        fields = S.beta_fields(beta)
        assert fields["beta_schedule"] == name and fields["trained_betas"] is None
        theirs = DDPMScheduler(num_train_timesteps=1000, **fields).betas.double()
        assert torch.allclose(theirs, beta, rtol=1e-6, atol=0), name
    bent = schedules.linear(1000) * (1 + 0.01 * torch.linspace(0, 1, 1000) ** 2)
    assert S.beta_fields(bent)["trained_betas"] == bent.tolist()


def test_class_conditional_export(tmp_path):
    """A class-conditional model exports its class embedding (K + 1 rows, the null class last)
    without model_index.json (DDPMPipeline cannot pass labels), says so, and imports back with
    its class names."""
    module = tiny_module(net={"num_classes": 3})
    module.class_names = ["a", "b", "c"]
    notes = F.export(module, tmp_path / "out")
    assert any("class_labels" in n for n in notes)
    assert not (tmp_path / "out" / "model_index.json").exists()
    assert (
        json.loads((tmp_path / "out" / "unet" / "config.json").read_text())["num_class_embeds"] == 4
    )
    back = load_module(f"diffusers:{tmp_path / 'out'}")
    assert back.num_classes == 3 and back.class_names == ["a", "b", "c"]


def test_edm_export_preconditions_as_diffusers(tmp_path):
    """process=edm exports an EDMEulerScheduler whose preconditioning (c_in, c_noise, c_skip,
    c_out) around the exported UNet2DModel gives our denoiser D(x; σ) to 1e-5."""
    module = DiffusionModule(
        net=NET, schedule={"_target_": "diffusion.processes.schedules.linear", "_partial_": True},
        T=20, image_shape=[1, 8, 8], optimizer=F.DEFAULT_OPTIMIZER, prediction="edm",
        process={"_target_": "diffusion.processes.edm.EDM"},
        sampler={"_target_": "diffusion.samplers.karras.heun", "_partial_": True, "steps": 5},
    ).eval()  # fmt: skip
    randomize(module.ema.module)
    notes = F.export(module, tmp_path / "out")
    assert any("EDMEulerScheduler" in n for n in notes)
    scheduler = EDMEulerScheduler.from_pretrained(tmp_path / "out" / "scheduler")
    unet = UNet2DModel.from_pretrained(tmp_path / "out" / "unet").eval()
    x, sigma = torch.randn(2, 1, 8, 8) * 3, torch.tensor([0.5, 3.0])
    c_in = scheduler.precondition_inputs(x, sigma[:, None, None, None])
    c_noise = scheduler.precondition_noise(sigma)
    with torch.no_grad():
        theirs = scheduler.precondition_outputs(x, unet(c_in, c_noise).sample,
                                                sigma[:, None, None, None])  # fmt: skip
        ours = module.predictor()(x, sigma).x0_hat
    assert (ours - theirs).abs().max() < 1e-5 < (ours - x).abs().max()


# ----- fine-tuning from diffusers weights ---------------------------------------------------


def test_init_from_diffusers(tmp_path, tiny):
    """module.init_from=diffusers:<folder> trains from the folder's weights with its network,
    schedule and target: the run's checkpoint after one step is the imported model moved by
    one optimizer step (close to it, unlike a fresh initialisation)."""
    from diffusion.train import train

    from conftest import compose_train

    big = DiffusionModule(
        net={**NET, "image_size": 16}, T=20, image_shape=[1, 16, 16], prediction="v",
        schedule={"_target_": "diffusion.processes.schedules.cosine", "_partial_": True},
        optimizer=F.DEFAULT_OPTIMIZER,
    )  # fmt: skip
    randomize(big.net)
    big.ema.module.load_state_dict(big.net.state_dict())
    F.export(big, tmp_path / "pipe")
    start = f"module.init_from=diffusers:{tmp_path / 'pipe'}"
    train(compose_train([*tiny, "trainer.max_steps=1", start], tmp_path / "run"))
    trained = load_module(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert trained.hparams.prediction == "v" and trained.hparams.T == 20
    assert torch.allclose(trained.process.beta64, schedules.cosine(20))
    imported = big.net.state_dict()
    moved = max((w - imported[k]).abs().max() for k, w in trained.net.state_dict().items())
    fresh = DiffusionModule(**trained.hparams).net.state_dict()
    control = max((w - imported[k]).abs().max() for k, w in fresh.items())
    assert moved < 0.02 < 0.1 < control
    assert "init_from: diffusers:" in (tmp_path / "run" / "config.yaml").read_text()


def test_init_from_of_another_size_is_refused(tmp_path, tiny):
    from diffusion.train import train

    from conftest import compose_train

    F.export(tiny_module(), tmp_path / "pipe")  # 8x8 images; the tiny run's data are 16x16
    cfg = compose_train([*tiny, f"module.init_from=diffusers:{tmp_path / 'pipe'}"], tmp_path / "r")
    with pytest.raises(ConfigError, match=r"module.init_from=.*\(1, 8, 8\).*\(1, 16, 16\)"):
        train(cfg)
    cfg = compose_train([*tiny, "module.init_from=diffusers:/no/such"], tmp_path / "r")
    with pytest.raises(ConfigError, match=r"^module.init_from=.diffusers:/no/such.: no folder"):
        train(cfg)
    assert not (tmp_path / "r").exists()


# ----- bad input --------------------------------------------------------------------------


def test_export_cli_and_bad_input(tmp_path, tiny_ckpt, capsys, monkeypatch):
    """python -m diffusion.export writes a folder with a model card; an out folder that holds
    files is refused (nothing touched) unless overwrite=true; exit status 2, one line."""
    from hydra import compose, initialize_config_module

    from diffusion.export import run

    def config(*overrides):
        with initialize_config_module("diffusion.conf", version_base="1.3"):
            return compose("export", overrides=[f"ckpt={tiny_ckpt}", *overrides])

    out = tmp_path / "out"
    notes = run(config(f"out={out}"))
    assert notes == [] and (out / "model_index.json").is_file()
    # the trained checkpoint in DDPMPipeline from the same generator: our ancestral sampler's
    module = load_module(tiny_ckpt)
    images = DDPMPipeline.from_pretrained(out)(
        batch_size=2,
        generator=torch.Generator().manual_seed(0),
        num_inference_steps=20,
        output_type="np",
    ).images
    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, *module.image_shape, generator=gen)
    ours = ddpm_ancestral(module.predictor(), x_T, module.process, generator=gen)
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(ours - images).max() < 1e-4
    card = (out / "README.md").read_text()
    assert "digits" in card.lower() and "T = 20" in card and "val/loss" in card
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    with pytest.raises(ConfigError, match=r"out=.*already holds files.*overwrite=true"):
        run(config(f"out={tmp_path / 'full'}"))
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["mine.txt"]
    from diffusion.export import main

    capsys.readouterr()
    monkeypatch.setattr("sys.argv", ["export", f"ckpt={tiny_ckpt}", f"out={tmp_path / 'full'}"])
    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1 and "already holds files" in err
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["mine.txt"]
    run(config(f"out={tmp_path / 'full'}", "overwrite=true"))
    assert (tmp_path / "full" / "unet" / "config.json").is_file()
    assert not (tmp_path / "full" / "mine.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no leftovers


def write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


STABLE_DIFFUSION = {"_class_name": "StableDiffusionPipeline",
                    "unet": ["diffusers", "UNet2DConditionModel"]}  # fmt: skip


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: d.mkdir(), r"not a diffusers model folder"),
        (lambda d: write_json(d / "model_index.json", STABLE_DIFFUSION),
         r"StableDiffusionPipeline with a UNet2DConditionModel: only DDPM-style UNet2DModel"),
        (lambda d: write_json(d / "unet" / "config.json", {"_class_name": "UNet2DConditionModel",
                                                           "block_out_channels": [8]}),
         r"_class_name='UNet2DConditionModel' \(a text-conditional"),
    ],
)  # fmt: skip
def test_import_refuses_what_is_not_a_ddpm_unet(tmp_path, setup, message):
    setup(tmp_path / "m")
    if (tmp_path / "m" / "unet").is_dir():
        write_json(tmp_path / "m" / "scheduler" / "scheduler_config.json", {})
    with pytest.raises(ConfigError, match=message):
        load_module(f"diffusers:{tmp_path / 'm'}")


@pytest.mark.parametrize(
    "key, value",
    [("resnet_time_scale_shift", "scale_shift"), ("act_fn", "gelu"),
     ("up_block_types", ["UpBlock2D", "UpBlock2D"]), ("num_class_embeds", 10)],
)  # fmt: skip
def test_import_names_the_key_it_cannot_map(tmp_path, key, value):
    config = {**DDPM_ORIGINAL, key: value}
    folder = save_diffusers(tmp_path, config, DDPMScheduler(num_train_timesteps=10))
    with pytest.raises(ConfigError, match=rf"unet {key}=.*cannot be represented"):
        load_module(f"diffusers:{folder}")


def test_scheduler_keys_it_cannot_map(tmp_path):
    folder = save_diffusers(tmp_path, DDPM_ORIGINAL, DDPMScheduler(num_train_timesteps=10,
                                                                   thresholding=True))  # fmt: skip
    with pytest.raises(ConfigError, match=r"scheduler thresholding=True is not supported"):
        load_module(f"diffusers:{folder}")


def test_hub_id_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = r"'google/ddpm-cifar10-32' is not a folder here and cannot be downloaded.*huggingface"
    with pytest.raises(UserError, match=offline):
        load_module("diffusers:google/ddpm-cifar10-32")
    with pytest.raises(
        ConfigError, match=r"no folder 'no/such/folder' here, and it is not a hub id"
    ):
        load_module("diffusers:no/such/folder")


def test_sample_entry_point_reads_a_diffusers_folder(tmp_path):
    """``python -m diffusion.sample ckpt=diffusers:<folder>`` (in-process): the folder's model
    draws the same images as the module that was exported; info.json names the folder."""
    from hydra import compose, initialize_config_module

    from diffusion.evaluation.draw import draw, to_uint8
    from diffusion.sample import run

    module = tiny_module()
    F.export(module, tmp_path / "pipe")
    spec = f"diffusers:{tmp_path / 'pipe'}"
    with initialize_config_module("diffusion.conf", version_base="1.3"):
        cfg = compose("sample", overrides=[f"ckpt={spec}", "n=4", "batch_size=4", "strip_n=0",
                                           f"out_dir={tmp_path / 's'}", "device=cpu"])  # fmt: skip
    info = run(cfg)
    assert info["ckpt"] == spec
    images = torch.from_numpy(np.load(tmp_path / "s" / "samples.npz")["images"])
    expected, _ = draw(module, 4, 4, 0, None)
    assert torch.equal(images.permute(0, 3, 1, 2), to_uint8(expected))
    other, _ = draw(module, 4, 4, 1, None)  # control: another seed
    assert not torch.equal(images.permute(0, 3, 1, 2), to_uint8(other))


def test_a_family_without_a_diffusers_scheduler_exports_its_unet(tmp_path):
    """VE SDE: diffusers has no scheduler with its label, so only unet/ (no scheduler/, no
    model_index.json), a note saying so, and diffusion_lab.json: the import is the same model."""
    module = tiny_module(
        process={"_target_": "diffusion.processes.sde.VESDE", "sigma_min": 0.01, "sigma_max": 50},
        sampler={"_target_": "diffusion.samplers.sde.euler_maruyama", "_partial_": True},
    )
    notes = F.export(module, tmp_path / "out")
    assert len(notes) == 1 and "no scheduler for process=ve_sde" in notes[0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "README.md", "diffusion_lab.json", "unet"
    ]  # fmt: skip
    back = load_module(f"diffusers:{tmp_path / 'out'}")
    assert back.process.family == "ve_sde" and back.process.sigma_max == 50
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.9])
    with torch.no_grad():
        assert torch.equal(back.predictor()(x, t).x0_hat, module.predictor()(x, t).x0_hat)
