"""Text conditioning: the byte tokenizer and encoder, cross-attention with padding masks, captioned
image folders, caption dropout, prompts through guidance and the sample CLI, and bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from PIL import Image

from diffusion.errors import ConfigError, DataError
from diffusion.nn import UNet
from diffusion.nn.text import PAD, ByteEncoder, TextConditioned
from diffusion.processes import schedules
from diffusion.processes.analytic import ClassGaussianOracle
from diffusion.processes.ddpm import GaussianDiffusion
from diffusion.processes.guidance import Guided
from diffusion.training.data import ImageFolderDataModule

from conftest import TINY, compose_train

SMALL_UNET = dict(image_size=8, in_channels=1, width=8, channel_mult=(1, 2), num_res_blocks=1,
                  attention_levels=(1,), norm_groups=4)  # fmt: skip
TEXT = ["text_encoder=bytes", "text_encoder.width=16", "text_encoder.depth=1",
        "text_encoder.max_length=24", "data=image_folder", "data.channels=1",
        "data.image_size=16", "data.val_fraction=0.25"]  # fmt: skip


def test_byte_tokens_and_truncation(caplog):
    """BOS, then byte b as b + 2, padded with PAD; a prompt longer than the context is cut to
    max_length - 1 bytes with one warning naming it (not one per call)."""
    enc = ByteEncoder(width=8, depth=1, heads=2, max_length=6)
    ids = enc.tokenize(["ab", "", "é"])
    assert ids.tolist() == [[1, 99, 100, PAD, PAD, PAD], [1] + [PAD] * 5,
                            [1, 0xC3 + 2, 0xA9 + 2, PAD, PAD, PAD]]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="diffusion.nn.text"):
        long = enc.tokenize(["abcdefgh", "abcdefgh"])
        enc.tokenize(["abcdefgh"])
    assert long[0].tolist() == [1, 99, 100, 101, 102, 103]
    warnings = [r for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1 and "'abcdefgh' has more than 5 bytes" in warnings[0].getMessage()


def randomized(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return net


def test_padding_is_masked_out():
    """The output does not depend on the context length beyond the prompt (padding masked in
    the encoder and the cross-attention); control: another prompt changes it."""
    unet = randomized(UNet(**SMALL_UNET, context_dim=16))
    short = randomized(ByteEncoder(16, 1, 2, max_length=12), seed=1)
    longer = ByteEncoder(16, 1, 2, max_length=20)
    state = short.state_dict()
    state["position"] = torch.cat([state["position"], torch.randn(8, 16)])  # unused positions
    longer.load_state_dict(state)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 9])
    a, b = TextConditioned(unet, short), TextConditioned(unet, longer)
    with torch.no_grad():
        out = a(x, t, a.tokenize(["a thin", ""]))
        assert (b(x, t, b.tokenize(["a thin", ""])) - out).abs().max() < 1e-5
        assert (b(x, t, b.tokenize(["a bold", ""])) - out)[0].abs().max() > 1e-3


def test_cross_attention_starts_as_the_identity():
    """Cross-attention is created last and zero-initialised: a text U-Net drawn from the same
    seed is the plain U-Net until it trains (control: a trained projection changes it)."""
    torch.manual_seed(0)
    plain = UNet(**SMALL_UNET)
    torch.manual_seed(0)
    text = UNet(**SMALL_UNET, context_dim=16)
    randomized(plain)
    own = text.state_dict()
    own.update(plain.state_dict())
    text.load_state_dict(own)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 9])
    context, mask = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(text(x, t, context=context, context_mask=mask), plain(x, t))
        text.cross["mid"].proj.weight.normal_()
        assert not torch.allclose(text(x, t, context=context, context_mask=mask), plain(x, t))
    with pytest.raises(ValueError, match="needs a context"):
        text(x, t)


def test_prompts_are_guided_as_classes():
    """Guidance over prompts is the guidance over classes: an exact network for two Gaussian
    classes read through prompts ("zero", "one"; ∅ the empty prompt) gives, through Guided,
    the same outputs as the class-conditional one for w = 0 and w = 2 (whose distribution
    tests/test_guidance.py checks); control: another prompt differs."""
    enc = ByteEncoder(8, 1, 2, max_length=8)
    process = GaussianDiffusion(schedules.linear(50))
    oracle = ClassGaussianOracle(process, [-1.0, 1.0], 0.3, 0.0, 1.0)
    names = {"zero": 0, "one": 1, "": 2}
    rows = {tuple(enc.tokenize([p])[0].tolist()): c for p, c in names.items()}

    def by_prompt(x, label, ids):
        classes = torch.tensor([rows[tuple(r.tolist())] for r in ids])
        return oracle(x, label, classes)

    x, label = torch.randn(4, 1, 4, 4), torch.full((4,), 25)
    prompts = ["zero", "one", "one", "zero"]
    classes = torch.tensor([0, 1, 1, 0])
    for w in (0.0, 2.0):
        text = Guided(by_prompt, enc.tokenize(prompts), w, null=enc.tokenize([""])[0])
        plain = Guided(oracle, classes, w, null=2)
        assert torch.equal(text(x, label), plain(x, label))
    other = Guided(by_prompt, enc.tokenize(["one"] * 4), 2.0, null=enc.tokenize([""])[0])
    assert not torch.equal(other(x, label), Guided(oracle, classes, 2.0, null=2)(x, label))


# ----- captioned data -------------------------------------------------------------------


def make_folder(root: Path, captions: list[str], layout: str = "jsonl") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i, text in enumerate(captions):
        name = f"img_{i:03d}.png"
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(root / name)
        if layout == "txt":
            (root / name).with_suffix(".txt").write_text(text + "\n")
        rows.append({"file_name": name, "text": text})
    if layout == "jsonl":
        (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


@pytest.mark.parametrize("layout", ["jsonl", "txt"])
def test_image_folder_yields_captions(tmp_path, layout):
    captions = [f"caption {i}" for i in range(8)]
    make_folder(tmp_path / "d", captions, layout)
    data = ImageFolderDataModule(str(tmp_path / "d"), 16, 1, batch_size=8, val_fraction=0.25)
    assert data.has_captions()
    data.captions = True
    data.setup()
    pairs = [data.train_set[i] for i in range(len(data.train_set))]
    files = data.train_set.dataset.files
    for (image, caption), index in zip(pairs, data.train_set.indices, strict=True):
        assert image.shape == (1, 16, 16) and caption == f"caption {int(files[index].stem[4:])}"
    plain = ImageFolderDataModule(str(tmp_path / "d"), 16, 1, batch_size=8)
    plain.setup()  # not asked for captions: images only
    assert isinstance(plain.train_set[0], torch.Tensor)


def test_caption_files_naming_missing_images_or_images_without_one(tmp_path):
    root = make_folder(tmp_path / "d", ["a", "b"])
    with open(root / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "gone.png", "text": "c"}) + "\n")
    data = ImageFolderDataModule(str(root), 16, 1)
    data.captions = True
    with pytest.raises(
        DataError, match=r"metadata.jsonl:3 names 'gone.png', which is not an image"
    ):
        data.setup()
    root = make_folder(tmp_path / "e", ["a", "b", "c"], layout="txt")
    (root / "img_001.txt").unlink()
    data = ImageFolderDataModule(str(root), 16, 1)
    data.captions = True
    with pytest.raises(DataError, match=r"1 image\(s\) under .* have no caption \(first: img_001"):
        data.setup()


# ----- training and sampling ------------------------------------------------------------


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory) -> Path:
    from diffusion.train import train

    root = tmp_path_factory.mktemp("captions")
    make_folder(root / "d", ["a thin seven", "a bold one"] * 8)
    out = root / "run"
    train(compose_train([*TINY, *TEXT, f"data.root={root / 'd'}", "trainer.max_steps=2"], out))
    return out / "checkpoints" / "last.ckpt"


def test_training_drops_captions_to_the_empty_prompt(text_ckpt):
    """cond_drop_prob of the captions become the empty prompt in a training batch (control:
    p = 0 drops none)."""
    from diffusion.checkpoints import load_module

    module = load_module(text_ckpt).train()
    seen = []
    module.objective = lambda net, x0, y=None: seen.append(y) or torch.zeros(x0.shape[0])
    module.log = lambda *args, **kwargs: None  # no trainer here
    null = module.net.null()
    for p, low, high in ((0.3, 0.25, 0.35), (0.0, 0.0, 0.0)):
        module.hparams.cond_drop_prob = p
        seen.clear()
        module.training_step((torch.zeros(2000, 1, 16, 16), ["a thin seven"] * 2000), 0)
        dropped = (seen[0] == null).all(dim=1).float().mean()
        assert low <= dropped <= high


def sample_cfg(ckpt, tmp_path, *overrides):
    with initialize_config_module("diffusion.conf", version_base="1.3"):
        return compose("sample", overrides=[f"ckpt={ckpt}", f"out_dir={tmp_path / 'out'}",
                                            "device=cpu", "strip_n=0", *overrides])  # fmt: skip


def test_sample_cli_prompts(text_ckpt, tmp_path):
    """prompt= draws n images of the prompt, prompts_file= n per line, the grid one row per
    prompt; the same seed gives the images of model.sample(prompts=…) (control: other prompts
    give others)."""
    from diffusion.checkpoints import load_module
    from diffusion.evaluation.draw import draw, to_uint8
    from diffusion.sample import run

    (tmp_path / "prompts.txt").write_text("a thin seven\n\na bold one\n")
    info = run(sample_cfg(text_ckpt, tmp_path, f"prompts_file={tmp_path / 'prompts.txt'}", "n=2",
                          "batch_size=4", "guidance=2"))  # fmt: skip
    assert info["prompts"] == ["a thin seven", "a bold one"] and info["n"] == 4
    saved = np.load(tmp_path / "out" / "samples.npz")
    assert saved["prompts"].tolist() == ["a thin seven"] * 2 + ["a bold one"] * 2
    module = load_module(text_ckpt)
    prompts = ["a thin seven"] * 2 + ["a bold one"] * 2
    images, _ = draw(module, 4, 4, 0, None, progress=False, prompts=prompts, guidance=2.0)
    assert np.array_equal(saved["images"], to_uint8(images).permute(0, 2, 3, 1).numpy())
    other, _ = draw(module, 4, 4, 0, None, progress=False, prompts=prompts[::-1], guidance=2.0)
    assert not torch.equal(other, images)
    assert (tmp_path / "out" / "grid.png").is_file()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["labels=[1]"], r"labels=\[1\] needs a class-conditional checkpoint; last.ckpt takes "
                         r"prompts"),
        (["guidance=1"], r"guidance=1 needs prompt= or prompts_file="),
        (["prompt=a", "prompts_file={empty}"], r"prompt='a' and prompts_file=.*: give one"),
        (["prompts_file={empty}"], r"prompts_file=.* holds no prompt"),
    ],
)  # fmt: skip
def test_sample_bad_prompt_input(text_ckpt, tmp_path, overrides, message):
    from diffusion.sample import run

    (tmp_path / "empty.txt").write_text("\n \n")
    overrides = [o.format(empty=tmp_path / "empty.txt") for o in overrides]
    with pytest.raises(ConfigError, match=message):
        run(sample_cfg(text_ckpt, tmp_path, *overrides))
    assert not (tmp_path / "out").exists()


def test_prompts_for_a_model_without_text(tiny_ckpt, tmp_path):
    from diffusion.sample import run

    message = r"prompt='a thin seven' needs a text-conditional checkpoint; last.ckpt was trained"
    with pytest.raises(ConfigError, match=message):
        run(sample_cfg(tiny_ckpt, tmp_path, "prompt=a thin seven"))


def test_text_encoder_without_captions_or_with_another_width(tmp_path, tiny):
    from diffusion.train import train

    with pytest.raises(ConfigError, match=r"text_encoder= asks for a text-conditional model, but "
                                          r"this data has no captions"):  # fmt: skip
        train(compose_train([*tiny, "text_encoder=bytes"], tmp_path / "a"))
    root = make_folder(tmp_path / "d", ["x"] * 4)
    cfg = compose_train([*tiny, *TEXT, f"data.root={root}", "model.context_dim=8"], tmp_path / "b")
    with pytest.raises(
        ConfigError, match=r"model.context_dim=8 but the text encoder's width is 16"
    ):
        train(cfg)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ----- transformers encoders (CLIP, T5) from tiny random configs, offline --------------------


def tiny_encoder_folder(folder: Path, kind: str) -> Path:
    """A saved text encoder with random weights and a word-level tokenizer, as a hub folder."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    words = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    special = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    words.train_from_iterator(
        ["a thin bold seven one"], trainers.WordLevelTrainer(special_tokens=special)
    )
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=words, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
        eos_token="[EOS]",
    )  # fmt: skip
    torch.manual_seed(0)
    if kind == "clip":
        config = transformers.CLIPTextConfig(
            vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=16, pad_token_id=0, bos_token_id=2,
            eos_token_id=3,
        )  # fmt: skip
        model = transformers.CLIPTextModel(config)
    else:
        config = transformers.T5Config(vocab_size=16, d_model=24, d_kv=12, d_ff=48, num_layers=1,
                                       num_heads=2, pad_token_id=0, eos_token_id=3)  # fmt: skip
        model = transformers.T5EncoderModel(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind, width", [("clip", 32), ("t5", 24)])
def test_pretrained_encoders_are_frozen_and_outside_checkpoints(tmp_path, kind, width):
    """CLIP's and T5's encoders load from a folder, give a (B, L, D) context with the padding
    masked, hold no trainable parameters and no state (a checkpoint names them), and the EMA's
    copy shares the model; a prompt longer than max_length is truncated with a warning."""
    import copy

    from diffusion.nn.text import PretrainedTextEncoder

    folder = tiny_encoder_folder(tmp_path / kind, kind)
    enc = PretrainedTextEncoder(kind, str(folder), max_length=4)
    ids = enc.tokenize(["a thin seven", "", "a thin bold seven one"])
    assert ids.shape == (3, 4) and (ids[0, :3] != PAD).all() and ids[0, 3] == PAD
    assert (ids[1] != PAD).sum() == 1  # the empty prompt keeps one token
    context, mask = enc(ids)
    assert context.shape == (3, 4, width) and torch.equal(mask, ids != PAD)
    net = TextConditioned(UNet(**SMALL_UNET, context_dim=width), enc)
    assert not any(n.startswith("encoder") for n, _ in net.named_parameters())
    assert not any(k.startswith("encoder") for k in net.state_dict())
    assert copy.deepcopy(net).encoder.model is enc.model
    other, _ = enc(enc.tokenize(["a bold seven", "", "a thin bold seven one"]))  # control
    assert (other[0] - context[0]).abs().max() > 1e-4 and torch.equal(other[1], context[1])


def test_training_with_a_clip_encoder_folder(tmp_path, tiny):
    """text_encoder=clip with a local folder trains end to end; its checkpoint holds no encoder
    weights and samples with prompts; a folder of another kind or a missing one is one line."""
    from diffusion.checkpoints import load_module
    from diffusion.train import train

    folder = tiny_encoder_folder(tmp_path / "clip", "clip")
    root = make_folder(tmp_path / "d", ["a thin seven", "a bold one"] * 4)
    common = [*tiny, *TEXT[4:], f"data.root={root}", "text_encoder=clip", "trainer.max_steps=2",
              "text_encoder.max_length=6"]  # fmt: skip
    train(compose_train([*common, f"text_encoder.name={folder}"], tmp_path / "run"))
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any(".encoder." in k for k in ckpt["state_dict"])
    module = load_module(tmp_path / "run" / "checkpoints" / "last.ckpt")
    images = module.sample(2, prompts=["a thin seven", "a bold one"], guidance=1.0,
                           generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()
    t5 = tiny_encoder_folder(tmp_path / "t5", "t5")
    refused = [(t5, r"holds a 't5' model, not a clip text encoder"),
               (tmp_path / "none", r"is neither a folder with a text encoder nor")]  # fmt: skip
    for name, message in refused:
        cfg = compose_train([*common, f"text_encoder.name={name}"], tmp_path / "bad")
        with pytest.raises(ConfigError, match=message):
            train(cfg)
        assert not (tmp_path / "bad").exists()


# ----- webdataset shards --------------------------------------------------------------------


def make_shards(folder: Path, shards: int = 3, per_shard: int = 4) -> str:
    """Tar shards of 16×16 PNGs whose pixels all equal their index, captioned "image <index>"."""
    import io
    import tarfile

    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(folder / f"train-{s:03d}.tar", "w") as tar:
            for i in range(s * per_shard, (s + 1) * per_shard):
                png = io.BytesIO()
                Image.fromarray(np.full((16, 16), i, dtype=np.uint8)).save(png, format="PNG")
                for suffix, data in (("png", png.getvalue()), ("txt", f"image {i}".encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / f"train-{{000..{shards - 1:03d}}}.tar")


def test_webdataset_splits_shards_across_ranks_and_workers(tmp_path, monkeypatch):
    """Each sample (image with its own caption) is read once per epoch across 2 ranks × 2
    workers; the last shard is held out for validation."""
    pytest.importorskip("webdataset")
    from diffusion.training.webdata import WebDataModule

    urls = make_shards(tmp_path / "shards", shards=5)
    seen = []
    for rank in (0, 1):
        data = WebDataModule(urls, 16, 1, batch_size=3, num_workers=2, shuffle_buffer=4)
        monkeypatch.setattr(data, "_rank", lambda rank=rank: (2, rank))
        data.captions = True
        data.setup()
        for images, captions in data.train_dataloader():
            for image, caption in zip(images, captions, strict=True):
                assert caption == f"image {int(image[0, 0, 0])}" and image.shape == (1, 16, 16)
                seen.append(caption)
    assert sorted(seen) == sorted(f"image {i}" for i in range(16))  # shards 0-3, once each
    val = [c for _, batch in data.val_dataloader() for c in batch]
    assert sorted(val) == [f"image {i}" for i in range(16, 20)]


def test_webdataset_trains_a_text_model_and_refuses_bad_shards(tmp_path, tiny):
    """A text model trains on shards, with the FID callback's reference drawn from the stream;
    missing shards, or one shard without val_urls, are one line each."""
    pytest.importorskip("webdataset")
    from diffusion.train import train

    urls = make_shards(tmp_path / "shards")
    data = ["data=webdataset", f"data.urls='{urls}'", "data.channels=1", "data.image_size=16",
            "data.num_workers=0", "data.pin_memory=false"]  # fmt: skip
    text = ["text_encoder=bytes", "text_encoder.width=16", "text_encoder.depth=1"]
    fid = ["callbacks.fid.every_n_steps=2", "callbacks.fid.n=4", "callbacks.fid.batch_size=4",
           "callbacks.fid.reference_n=6",
           "callbacks.fid.extractor._target_=test_metrics.SmallFeatures",
           "+callbacks.fid.sampler={_target_:diffusion.samplers.ddim,_partial_:true,steps:2}",
           f"callbacks.fid.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    train(compose_train([*tiny, *data, *text, *fid, "trainer.max_steps=2"], tmp_path / "run"))
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    metrics = (tmp_path / "run" / "csv" / "metrics.csv").read_text()
    assert "val/fid" in metrics.splitlines()[0]  # reference features from the stream
    missing = str(tmp_path / "shards" / "train-{000..004}.tar")
    single = str(tmp_path / "shards" / "train-000.tar")
    refused = [(missing, r"2 shard\(s\) missing, first .*train-003.tar"), (single, "is one shard")]
    for urls, message in refused:
        with pytest.raises((ConfigError, DataError), match=message):
            train(compose_train([*tiny, *data, *text, f"data.urls='{urls}'"], tmp_path / "bad"))
        assert not (tmp_path / "bad").exists()


def test_prompt_contexts_are_cached(tmp_path):
    """cache_size > 0: each distinct prompt is encoded once (the model runs only on new ones),
    the cached context is the encoder's own to float16 precision, and the least recently used
    prompt is evicted beyond the size (control: without a cache every call runs the model)."""
    from diffusion.nn.text import PretrainedTextEncoder

    folder = tiny_encoder_folder(tmp_path / "clip", "clip")
    cached = PretrainedTextEncoder("clip", str(folder), max_length=5, cache_size=2)
    plain = PretrainedTextEncoder("clip", str(folder), max_length=5)
    rows = []
    for enc in (cached, plain):
        calls = []
        enc.model.register_forward_hook(lambda m, i, o, calls=calls: calls.append(i))
        a = enc.tokenize(["a thin seven", "a bold one"])
        first, _ = enc(a)
        again, _ = enc(a[[1, 0]])
        rows.append((len(calls), first, again))
    (n_cached, first, again), (n_plain, reference, _) = rows
    assert n_cached == 1 and n_plain == 2
    assert torch.equal(again, first[[1, 0]])
    assert (first - reference).abs().max() < 1e-2 and (first - reference).abs().max() > 0
    cached(cached.tokenize(["a one"]))  # a third prompt evicts the least recent, "a bold one"
    key = {p: cached.tokenize([p])[0].numpy().tobytes() for p in ("a bold one", "a thin seven")}
    assert len(cached.cache) == 2
    assert key["a bold one"] not in cached.cache and key["a thin seven"] in cached.cache
