"""Our U-Net (diffusion.nn.UNet) as diffusers' ``UNet2DModel``, and back: configs and weights.

Both are DDPM's U-Net (Ho et al. 2020, Appendix B), block for block: a sinusoidal time
embedding through a two-layer MLP, at each level ``layers_per_block`` residual blocks (GroupNorm,
SiLU, conv, + projected embedding, GroupNorm, SiLU, dropout, conv, + shortcut), optional
self-attention after each, a down-sampling conv between levels; a middle of residual block,
attention, residual block; one more residual block per level on the way up, over the
concatenated skips; GroupNorm, SiLU, conv out. Only the names differ, and attention's q, k, v:
ours is one 1×1 conv giving [q; k; v] (head h at channels h·d … (h+1)·d of each), diffusers'
three linear maps with the same head layout. So the weights map exactly (the tests check the
outputs to 1e-5), and a configuration the other side cannot build is refused naming its key.

Nothing here imports diffusers: configs are plain dicts, weights plain state dicts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from diffusion.errors import ConfigError

# Our module prefixes and diffusers', as templates over the level {l} and block {i} indices.
PREFIXES = [
    ("time_mlp.0.", "time_embedding.linear_1."),
    ("time_mlp.2.", "time_embedding.linear_2."),
    ("input_conv.", "conv_in."),
    ("down.{l}.blocks.{i}.", "down_blocks.{l}.resnets.{i}."),
    ("down.{l}.attns.{i}.", "down_blocks.{l}.attentions.{i}."),
    ("downsample.{l}.conv.", "down_blocks.{l}.downsamplers.0.conv."),
    ("mid_block1.", "mid_block.resnets.0."),
    ("mid_attn.", "mid_block.attentions.0."),
    ("mid_block2.", "mid_block.resnets.1."),
    ("up.{l}.blocks.{i}.", "up_blocks.{l}.resnets.{i}."),
    ("up.{l}.attns.{i}.", "up_blocks.{l}.attentions.{i}."),
    ("upsample.{l}.conv.", "up_blocks.{l}.upsamplers.0.conv."),
    ("out.0.", "conv_norm_out."),
    ("out.2.", "conv_out."),
    ("class_emb.", "class_embedding."),
]
# Inside a residual block and an attention block (q, k, v are split and joined separately).
INNER = [
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("emb_proj.1.", "time_emb_proj."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("skip.", "conv_shortcut."),
    ("norm.", "group_norm."),
    ("proj.", "to_out.0."),
]
QKV = ("to_q.", "to_k.", "to_v.")


def _pattern(template: str) -> re.Pattern:
    escaped = re.escape(template).replace(r"\{l\}", r"(?P<l>\d+)").replace(r"\{i\}", r"(?P<i>\d+)")
    return re.compile(escaped)


_OURS = [(_pattern(a), b) for a, b in PREFIXES]
_THEIRS = [(_pattern(b), a) for a, b in PREFIXES]


def _rename(key: str, prefixes: list, inner: list[tuple[str, str]]) -> str | None:
    for pattern, template in prefixes:
        match = pattern.match(key)
        if match:
            head = template.format(**match.groupdict())
            rest = key[match.end() :]
            for ours, theirs in inner:
                if rest.startswith(ours):
                    return head + theirs + rest[len(ours) :]
            return head + rest
    return None


def to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our U-Net's state dict under diffusers' ``UNet2DModel`` names (tensors contiguous)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        value = value.detach().to("cpu").contiguous()
        if ".qkv." in key:
            head = _rename(key.split("qkv.")[0], _OURS, [])
            for name, part in zip(QKV, value.chunk(3, dim=0), strict=True):
                out[head + name + key.rsplit(".", 1)[1]] = (
                    part.flatten(1) if part.ndim > 1 else part
                )
            continue
        name = _rename(key, _OURS, INNER)
        if name is None:
            raise ValueError(f"no diffusers name for the U-Net weight {key!r}")
        if name.endswith("to_out.0.weight"):
            value = value.flatten(1)
        out[name] = value.contiguous()
    return out


def from_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``UNet2DModel`` state dict under our U-Net's names; ConfigError naming a weight that
    has no place in it."""
    inverse = [(b, a) for a, b in INNER]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if any(f".{q}" in key for q in QKV[1:]):
            continue  # joined with to_q
        if ".to_q." in key:
            head, kind = key.split("to_q.")
            parts = [state[head + q + kind] for q in QKV]
            joined = torch.cat(parts, dim=0)
            ours = _rename(head, _THEIRS, [])
            out[f"{ours}qkv.{kind}"] = joined[:, :, None, None] if joined.ndim == 2 else joined
            continue
        name = _rename(key, _THEIRS, inverse)
        if name is None:
            raise ConfigError(
                f"the diffusers U-Net's weight {key!r} has no counterpart in our U-Net "
                "(only DDPM-style UNet2DModel weights map)"
            )
        if name.endswith(".proj.weight"):  # a linear map -> a 1x1 conv
            value = value[:, :, None, None]
        out[name] = value
    return out


def unet_config(net_cfg: Mapping[str, Any], net: nn.Module) -> dict[str, Any]:
    """diffusers' ``UNet2DModel`` config of our network (its config node ``net_cfg`` and the
    built ``net``); ConfigError naming the ``model.`` key that diffusers cannot build."""
    mult = list(net_cfg.get("channel_mult", (1, 2, 2)))
    width = int(net_cfg.get("width", 32))
    groups = int(net_cfg.get("norm_groups", 32))
    heads = int(net_cfg.get("num_heads", 1))
    levels = range(len(mult))
    attention = sorted(set(net_cfg.get("attention_levels", (1,))))
    channels = [width * m for m in mult]
    if mult[0] != 1:
        raise ConfigError(
            f"model.channel_mult={mult} cannot be exported: diffusers' first level has the width "
            "of its input convolution, so channel_mult must start with 1"
        )
    odd = sorted({m.num_channels for m in net.modules() if isinstance(m, nn.GroupNorm)
                  if m.num_groups != groups})  # fmt: skip
    if odd:
        raise ConfigError(
            f"model.norm_groups={groups} does not divide the {odd} channels of some layers (we "
            "use fewer groups there, diffusers cannot): choose norm_groups dividing every width"
        )
    head_dim = None
    if heads > 1:
        widths = {channels[i] for i in attention} | {channels[-1]}
        if len(widths) > 1:
            raise ConfigError(
                f"model.num_heads={heads} cannot be exported: diffusers fixes the head width, so "
                f"attention at {sorted(widths)} channels would get different head counts"
            )
        head_dim = channels[-1] // heads
    num_classes = int(net_cfg.get("num_classes", 0))
    out_channels = next(m for m in reversed(list(net.modules())) if isinstance(m, nn.Conv2d))
    return {
        "_class_name": "UNet2DModel",
        "sample_size": int(net_cfg["image_size"]),
        "in_channels": int(net_cfg.get("in_channels", 1)),
        "out_channels": out_channels.out_channels,
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "flip_sin_to_cos": not net_cfg.get("sin_first", False),
        "freq_shift": _number(net_cfg.get("freq_shift", 0)),
        "down_block_types": [
            "AttnDownBlock2D" if i in attention else "DownBlock2D" for i in levels
        ],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": [
            "AttnUpBlock2D" if i in attention else "UpBlock2D" for i in reversed(levels)
        ],
        "block_out_channels": channels,
        "layers_per_block": int(net_cfg.get("num_res_blocks", 2)),
        "mid_block_scale_factor": 1,
        "downsample_padding": 0 if net_cfg.get("downsample_padding") == "same" else 1,
        "downsample_type": "conv",
        "upsample_type": "conv",
        "dropout": float(net_cfg.get("dropout", 0.0)),
        "act_fn": "silu",
        "attention_head_dim": head_dim,
        "norm_num_groups": groups,
        "norm_eps": float(net_cfg.get("norm_eps", 1e-5)),
        "resnet_time_scale_shift": "default",
        "add_attention": True,
        "class_embed_type": None,
        "num_class_embeds": num_classes + 1 if num_classes else None,
    }


def _number(value: float) -> int | float:
    """An integral value as an int (diffusers' configs write 1, not 1.0)."""
    return int(value) if float(value).is_integer() else float(value)


# UNet2DModel keys our U-Net has no choice in: the value it must have (diffusers' default).
FIXED = {
    "center_input_sample": False, "time_embedding_type": "positional", "time_embedding_dim": None,
    "mid_block_type": "UNetMidBlock2D", "mid_block_scale_factor": 1, "downsample_type": "conv",
    "upsample_type": "conv", "act_fn": "silu", "attn_norm_num_groups": None,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
}  # fmt: skip


def check_kind(config: Mapping[str, Any]) -> None:
    """ConfigError unless ``config`` is a UNet2DModel's (the kind whose weights map)."""
    kind = config.get("_class_name", "UNet2DModel")
    if kind != "UNet2DModel":
        what = " (a text-conditional, cross-attention U-Net)" if "Condition" in kind else ""
        raise ConfigError(
            f"unet _class_name={kind!r}{what} cannot be mapped: only DDPM-style UNet2DModel "
            "weights map onto our U-Net"
        )


def net_config(config: Mapping[str, Any], num_classes: int | None = None) -> dict[str, Any]:
    """Our U-Net's config node for a diffusers ``UNet2DModel`` config; ConfigError naming the
    first key our U-Net cannot represent. ``num_classes``: K of a class-conditional model whose
    null class is embedding K (ours); a foreign class-conditional model is refused. The output
    channels (C, or 2C with a learned variance) are the module's ``learn_sigma``, not the net's."""
    check_kind(config)

    def refuse(key: str, allowed: str) -> ConfigError:
        return ConfigError(
            f"unet {key}={config.get(key)!r} cannot be represented by our U-Net: {allowed}"
        )

    for key, value in FIXED.items():
        if key == "time_embedding_dim":
            if config.get(key) not in (None, 4 * config["block_out_channels"][0]):
                raise refuse(key, "it must be 4 x block_out_channels[0]")
        elif config.get(key, value) != value:
            raise refuse(key, f"it must be {value!r}")
    channels = list(config["block_out_channels"])
    width = channels[0]
    if any(c % width for c in channels):
        raise refuse("block_out_channels", "every level's channels must be a multiple of the first")
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    if len(down) != len(channels) or set(down) - {"DownBlock2D", "AttnDownBlock2D"}:
        raise refuse("down_block_types", "DownBlock2D or AttnDownBlock2D, one per level")
    attention = [i for i, kind in enumerate(down) if kind == "AttnDownBlock2D"]
    mirrored = [
        "AttnUpBlock2D" if i in attention else "UpBlock2D" for i in reversed(range(len(down)))
    ]
    if up != mirrored:
        raise refuse("up_block_types", f"the down blocks mirrored, {mirrored}")
    size = config.get("sample_size")
    if isinstance(size, list | tuple):
        if len(set(size)) != 1:
            raise refuse("sample_size", "square images only")
        size = size[0]
    if not isinstance(size, int):
        raise refuse("sample_size", "an integer side")
    head_dim = config.get("attention_head_dim")
    heads = (
        {1}
        if head_dim is None
        else {c // head_dim for c in [channels[i] for i in attention] + [channels[-1]]}
    )
    if len(heads) != 1 or (head_dim and any(c % head_dim for c in channels)):
        raise refuse("attention_head_dim", "one head count at every attention block")
    embeds = config.get("num_class_embeds")
    if embeds and num_classes is None:
        raise refuse(
            "num_class_embeds",
            "a class-conditional model from elsewhere has no null class for our guidance; only "
            "class-conditional models exported by diffusion.export are imported",
        )
    if bool(embeds) != bool(num_classes) or (embeds and embeds != num_classes + 1):
        raise refuse("num_class_embeds", f"{num_classes} classes and the null class")
    return {
        "_target_": "diffusion.nn.UNet",
        "image_size": size,
        "in_channels": int(config.get("in_channels", 3)),
        "width": width,
        "channel_mult": [c // width for c in channels],
        "num_res_blocks": int(config.get("layers_per_block", 2)),
        "attention_levels": attention,
        "dropout": float(config.get("dropout", 0.0)),
        "num_heads": heads.pop(),
        "norm_groups": int(config.get("norm_num_groups", 32)),
        "num_classes": int(num_classes or 0),
        "norm_eps": float(config.get("norm_eps", 1e-5)),
        "sin_first": not config.get("flip_sin_to_cos", True),
        "freq_shift": float(config.get("freq_shift", 0)),
        "downsample_padding": "same" if config.get("downsample_padding", 1) == 0 else "symmetric",
    }
