"""The peers' U-Nets, configured to match one of ours (``conf/model/*.yaml``).

- diffusers' ``UNet2DModel``: the same architecture block for block (residual blocks of
  GroupNorm, SiLU, conv with the time embedding added; attention at the same levels and in the
  middle; strided-conv down- and nearest+conv up-sampling), so the parameter count is equal.
- lucidrains' ``denoising_diffusion_pytorch.Unet``: its own design (linear attention at every
  level without full attention, RMSNorm, scale-shift time conditioning); its ``dim`` is chosen
  so that its parameter count is the nearest to ours (within 5 %).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def parameter_count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


class _SampleOf(nn.Module):
    """diffusers' models return an output object; the loops want the tensor."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x, t).sample


def diffusers_unet(model: Mapping) -> nn.Module:
    from diffusers import UNet2DModel

    levels = range(len(model["channel_mult"]))
    attention = set(model["attention_levels"])
    channels = [model["width"] * m for m in model["channel_mult"]]
    top = channels[max(attention)] if attention else channels[-1]
    net = UNet2DModel(
        sample_size=model["image_size"],
        in_channels=model["in_channels"],
        out_channels=model["in_channels"],
        block_out_channels=tuple(channels),
        layers_per_block=model["num_res_blocks"],
        down_block_types=tuple(
            "AttnDownBlock2D" if i in attention else "DownBlock2D" for i in levels
        ),
        up_block_types=tuple(
            "AttnUpBlock2D" if i in attention else "UpBlock2D" for i in reversed(levels)
        ),
        norm_num_groups=model["norm_groups"],
        attention_head_dim=top // model["num_heads"],
        dropout=model["dropout"],
    )
    return _SampleOf(net)


def lucidrains_unet(model: Mapping, target_parameters: int) -> nn.Module:
    from denoising_diffusion_pytorch import Unet

    attention = set(model["attention_levels"])

    def build(dim: int) -> nn.Module:
        return Unet(
            dim=dim,
            dim_mults=tuple(model["channel_mult"]),
            channels=model["in_channels"],
            dropout=model["dropout"],
            full_attn=tuple(i in attention for i in range(len(model["channel_mult"]))),
        )

    # parameters grow with dim (even: its sinusoidal embedding needs that): bisect for the dim
    # whose count is nearest to the target
    low, high = 2, 2 * model["width"]  # dim = 2 * half
    while high - low > 1:
        mid = (low + high) // 2
        if parameter_count(build(2 * mid)) < target_parameters:
            low = mid
        else:
            high = mid
    nets = [build(2 * low), build(2 * high)]
    return min(nets, key=lambda n: abs(parameter_count(n) - target_parameters))
