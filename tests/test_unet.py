"""The ε-prediction U-Net: shapes for every model config, the paper's parameter count."""

import pytest
import torch
from hydra.utils import instantiate

from diffusion.nn import UNet
from diffusion.nn.unet import timestep_embedding

from conftest import compose_train


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    "model,data,extra",
    [
        ("unet_small", "digits", []),
        ("unet_small", "mnist", []),
        ("unet_small", "cifar10", []),
        ("unet_base", "cifar10", []),
        ("unet_base", "mnist", ["data.image_size=32"]),
        ("unet_small", "image_folder", ["data.root=x", "data.image_size=64", "data.channels=1"]),
    ],
)
def test_output_shape_for_every_model_config(model, data, extra):
    cfg = compose_train([f"model={model}", f"data={data}", *extra])
    net = instantiate(cfg.model).eval()
    c, s = cfg.data.channels, cfg.data.image_size
    x = torch.randn(2, c, s, s)
    with torch.no_grad():
        out = net(x, torch.tensor([0, cfg.T - 1]))
    assert out.shape == x.shape


def test_unet_base_has_the_papers_35_7M_parameters():
    cfg = compose_train(["model=unet_base", "data=cifar10"])
    assert n_params(instantiate(cfg.model)) == 35_746_307


def test_unet_small_size():
    cfg = compose_train(["model=unet_small", "data=mnist"])
    assert 1.5e6 < n_params(instantiate(cfg.model)) < 2.5e6


def test_overrides_change_the_architecture():
    cfg = compose_train(["model.width=16", "model.channel_mult=[1,2]", "model.attention_levels=[]"])
    net = instantiate(cfg.model)
    assert net.input_conv.out_channels == 16 and len(net.down) == 2
    assert not any(type(m).__name__ == "AttentionBlock" for lvl in net.down for m in lvl.attns)


@pytest.mark.parametrize(
    "size,levels,suggest", [(30, 3, "28 or 32"), (28, 4, "24 or 32"), (2, 3, "4 or 8")]
)
def test_image_size_the_unet_cannot_take_names_sizes_that_work(size, levels, suggest):
    with pytest.raises(ValueError, match=suggest):
        UNet(size, channel_mult=[1] * levels)


def test_time_embedding_distinguishes_neighbouring_steps():
    emb = timestep_embedding(torch.tensor([0, 1, 999]), 32)
    assert emb.shape == (3, 32)
    assert (emb[0] - emb[1]).abs().max() > 0.1


def test_output_starts_at_zero_and_depends_on_t_after_a_step():
    net = UNet(8, 1, width=8, channel_mult=[1, 2], norm_groups=4)
    x = torch.randn(2, 1, 8, 8)
    assert torch.count_nonzero(net(x, torch.tensor([0, 5]))) == 0  # zero-initialised output conv
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(3):  # zero-initialised layers need two steps before t reaches the output
        opt.zero_grad()
        (net(x, torch.tensor([0, 5])) - 1).pow(2).mean().backward()
        opt.step()
    with torch.no_grad():
        assert not torch.allclose(net(x[:1], torch.tensor([0])), net(x[:1], torch.tensor([500])))


def test_dropout_keeps_the_mean_drops_p_and_is_off_in_eval():
    from diffusion.nn.unet import Dropout

    torch.manual_seed(0)
    drop = Dropout(0.2)
    x = torch.ones(200_000, requires_grad=True)
    y = drop(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.2) < 0.005  # ~0.0009 is the binomial std
    k = round(0.2 * 2**16)  # drop when a 16-bit lane is below k: rate k / 2^16, p to 2^-17
    assert torch.equal(y[y != 0], torch.full_like(y[y != 0], 2**16 / (2**16 - k)))
    assert abs(y.mean().item() - 1.0) < 0.01  # inverted dropout keeps the expectation
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d(x · mask)/dx = mask
    assert y.dtype == x.dtype
    drop.eval()
    assert torch.equal(drop(x), x)
    half = drop.train()(torch.ones(200_000, dtype=torch.bfloat16))
    assert half.dtype == torch.bfloat16
    assert abs((half == 0).float().mean().item() - 0.2) < 0.005
    assert torch.equal(Dropout(1.0)(x), torch.zeros_like(x))  # no division by 1 - p = 0


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_dropout_mask_is_elementwise_in_any_layout_and_in_place_on_request(memory_format):
    from diffusion.nn.unet import Dropout

    torch.manual_seed(0)
    x = torch.rand(8, 16, 9, 7).add_(1).contiguous(memory_format=memory_format)
    y = Dropout(0.5)(x)
    assert y.is_contiguous(memory_format=memory_format)
    kept = y != 0
    torch.testing.assert_close(y[kept], 2 * x[kept])  # each survivor scales its own element
    # independent of position: every channel and every pixel loses about half its elements
    assert kept.float().mean((0, 2, 3)).sub(0.5).abs().max() < 0.1
    assert kept.float().mean((0, 1)).sub(0.5).abs().max() < 0.15
    a = torch.randn(4, 3, 5, 5)
    original = a.clone()
    torch.manual_seed(1)
    out = Dropout(0.3, inplace=True)(a)
    assert out.data_ptr() == a.data_ptr()  # no new tensor
    torch.manual_seed(1)
    assert torch.equal(Dropout(0.3)(original), out)  # the same mask as out of place
