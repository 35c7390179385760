"""The U-Net of DDPM (Ho et al. 2020, Appendix B), in PyTorch.

A PixelCNN++-style U-Net: residual blocks (GroupNorm, SiLU, dropout) conditioned on a
sinusoidal time embedding through an MLP, self-attention at chosen levels, strided-conv
down-sampling and nearest + conv up-sampling, skip connections between mirrored blocks.
``unet_base`` (width 128, mult 1,2,2,2, 2 blocks, attention at 16×16, dropout 0.1) has
35.7M parameters, matching the paper's CIFAR-10 model.

Level ``i`` of ``channel_mult`` runs at resolution image_size / 2^i with
``width * channel_mult[i]`` channels; ``attention_levels`` lists the levels with attention
(level 1 of a 32×32 model is the paper's 16×16).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(
    t: torch.Tensor,
    dim: int,
    max_period: float = 10000.0,
    sin_first: bool = False,
    freq_shift: float = 0.0,
) -> torch.Tensor:
    """Sinusoidal embedding of t (Vaswani et al. 2017, as in DDPM): (B,) -> (B, dim).

    [cos(t ω_i), sin(t ω_i)] with ω_i = max_period^(-i / (half - freq_shift)), i < half = dim // 2
    (improved-diffusion's; diffusers' flip_sin_to_cos=True, freq_shift=0). DDPM's own code puts
    the sines first and divides by half - 1: ``sin_first=True, freq_shift=1``.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]
    parts = [torch.sin(args), torch.cos(args)] if sin_first else [torch.cos(args), torch.sin(args)]
    emb = torch.cat(parts, dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _norm(channels: int, groups: int, eps: float = 1e-5) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels, eps=eps)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class Dropout(nn.Dropout):
    """Inverted dropout, x · 1[u ≥ p] / (1 - p), as ``nn.Dropout``.

    On the CPU the mask is cut from raw random bits: each 64-bit draw of the generator gives four
    16-bit lanes u ∈ {0, …, 65535}, an element is dropped when u < k with k = round(65536 p), and
    kept ones are scaled by 1 / (1 - k/65536), so the output's expectation is x exactly and the
    drop rate is p to within 2^-17. ``nn.Dropout``'s ``bernoulli_`` and ``rand_like`` draw one
    random number per element; this draws a quarter as many, which makes a unet_small training
    step 1.04x faster than ``rand_like`` and 1.09x than ``bernoulli_`` (experiments/performance).
    Other devices use the fused ``F.dropout``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu":
            return super().forward(x)
        threshold = round(self.p * 2**16)
        if threshold == 2**16:  # p within 2^-17 of 1: everything dropped
            return super().forward(x)
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device)
        lanes = bits.random_(-(2**63), None).view(torch.int16)[:n]  # uniform on [-2^15, 2^15)
        keep = (lanes >= threshold - 2**15).to(x.dtype).mul_(2**16 / (2**16 - threshold))
        if x.is_contiguous(memory_format=torch.channels_last):  # the mask in x's layout
            keep = keep.as_strided(x.shape, x.stride())
        else:
            keep = keep.view(x.shape)
        return x.mul_(keep) if self.inplace else x * keep


class ResBlock(nn.Module):
    """h = conv(SiLU(GN(x))) + W·SiLU(emb); out = skip(x) + conv(dropout(SiLU(GN(h)))).

    The additions and the dropout write into tensors that nothing else holds (a convolution's
    output, SiLU's output, which its backward does not need), so a step allocates three tensors
    fewer per block: 1.016x a unet_small step on the CPU where freed memory goes back to the
    system, no measurable difference where it is kept (diffusion/allocator.py).
    """

    def __init__(
        self, c_in: int, c_out: int, emb_dim: int, dropout: float, groups: int, eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            _norm(c_in, groups, eps), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1)
        )
        self.emb_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, c_out))
        self.out_layers = nn.Sequential(
            _norm(c_out, groups, eps),
            nn.SiLU(),
            Dropout(dropout, inplace=True),
            _zero(nn.Conv2d(c_out, c_out, 3, padding=1)),
        )
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h += self.emb_proj(emb)[:, :, None, None]
        return self.out_layers(h).add_(self.skip(x))


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H·W positions, with a residual connection."""

    def __init__(self, channels: int, num_heads: int, groups: int, eps: float = 1e-5) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention: {channels} channels do not split into {num_heads} heads")
        self.num_heads = num_heads
        self.norm = _norm(channels, groups, eps)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        # Positions first, channels last: (B, HW, 3C) -> q, k, v of (B, heads, HW, C/heads) with
        # unit stride along C/heads, which scaled_dot_product_attention needs for its fused
        # (flash) kernels; strided q, k, v fall back to bmm + softmax, 1.1x slower on the CPU.
        # A free view for channels_last activations, one copy otherwise.
        qkv = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).contiguous()
        qkv = qkv.reshape(B, H * W, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C/heads)
        h = h.transpose(1, 2).reshape(B, H * W, C).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj(h)  # in x's layout (proj's output is channels_last-strided)


class CrossAttention(nn.Module):
    """Attention from the H·W positions to a context (B, L, D) of L tokens (a prompt's, from a
    text encoder), with the padding masked out, and a residual connection; zero-initialised, so
    a new cross-attention starts as the identity (Rombach et al. 2022, Saharia et al. 2022)."""

    def __init__(
        self, channels: int, context_dim: int, num_heads: int, groups: int, eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = _norm(channels, groups, eps)
        self.q = nn.Conv2d(channels, channels, 1)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        B, C, H, W = x.shape
        heads, d = self.num_heads, C // self.num_heads
        q = self.q(self.norm(x)).flatten(2).transpose(1, 2).reshape(B, H * W, heads, d)
        k, v = self.kv(context).reshape(B, context.shape[1], 2, heads, d).permute(2, 0, 3, 1, 4)
        attend = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, L): real tokens
        h = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=attend)
        h = h.transpose(1, 2).reshape(B, H * W, C).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj(h)


class Downsample(nn.Module):
    """A stride-2 3×3 convolution, padded by one pixel on every side (``symmetric``), or on the
    right and bottom only (``same``: TensorFlow's SAME padding, which DDPM's code used)."""

    def __init__(self, channels: int, padding: str = "symmetric") -> None:
        super().__init__()
        self.same = padding == "same"
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if self.same else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.same else x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """Residual blocks (each optionally followed by attention) at one resolution."""

    def __init__(self, blocks: list[ResBlock], attns: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attns = nn.ModuleList(attns)


class UNet(nn.Module):
    """net(x_t, t) or net(x_t, t, y): (B, C, H, W), (B,)[, (B,)] -> (B, C_out, H, W): DDPM's ε_θ,
    or any prediction target (C_out = 2C with a learned variance; diffusion.processes.prediction).

    Args:
        image_size: side of the (square) input; must be divisible by 2^(len(channel_mult) - 1).
        in_channels: image channels (1 grayscale, 3 RGB).
        width: base channel count (the paper's ``ch``).
        channel_mult: channels per level, as multiples of ``width``.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attention_levels: levels (indices into ``channel_mult``) with self-attention.
        dropout: dropout rate inside residual blocks.
        num_heads: attention heads.
        norm_groups: GroupNorm groups (gcd with the channel count is used).
        out_channels: output channels (default ``in_channels``).
        num_classes: K > 0 makes the network class-conditional: a learned embedding of the class
            y ∈ {0, …, K-1} is added to the time embedding, and class K is the learned null class
            ∅ (Ho & Salimans 2022), which ``y=None`` means. 0: unconditional.
        context_dim: D > 0 adds cross-attention to a context (B, L, D) (a prompt's tokens from a
            text encoder, diffusion.nn.text) after each self-attention; 0: none.
        norm_eps: ε of every GroupNorm (DDPM's code: 1e-6).
        sin_first, freq_shift: the time embedding's layout (:func:`timestep_embedding`).
        downsample_padding: ``symmetric`` or ``same`` (:class:`Downsample`).
        The last four only matter for weights made elsewhere (DDPM's released models through
        diffusion.interchange); the defaults are improved-diffusion's.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int = 1,
        width: int = 32,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_levels: Sequence[int] = (1,),
        dropout: float = 0.0,
        num_heads: int = 1,
        norm_groups: int = 32,
        out_channels: int | None = None,
        num_classes: int = 0,
        norm_eps: float = 1e-5,
        sin_first: bool = False,
        freq_shift: float = 0.0,
        downsample_padding: str = "symmetric",
        context_dim: int = 0,
    ) -> None:
        super().__init__()
        check_image_size(image_size, len(channel_mult))
        if width < 1 or num_res_blocks < 1 or not channel_mult or min(channel_mult) < 1:
            raise ValueError(
                f"model.width={width} and model.num_res_blocks={num_res_blocks} must be >= 1, and "
                f"model.channel_mult={list(channel_mult)} a non-empty list of integers >= 1"
            )
        if num_heads < 1 or norm_groups < 1:
            raise ValueError(
                f"model.num_heads={num_heads} and model.norm_groups={norm_groups} must be >= 1"
            )
        if out_channels is not None and out_channels < 1:
            raise ValueError(f"out_channels={out_channels} must be >= 1")
        bad = [lvl for lvl in attention_levels if not 0 <= lvl < len(channel_mult)]
        if bad:
            raise ValueError(
                f"attention_levels {list(bad)} out of range: levels are 0..{len(channel_mult) - 1}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
            raise ValueError(f"model.num_classes={num_classes!r} must be an integer >= 0")
        if downsample_padding not in ("symmetric", "same"):
            raise ValueError(
                f"model.downsample_padding={downsample_padding!r} is invalid: use symmetric or same"
            )
        if not norm_eps > 0 or not 0 <= freq_shift < width // 2:
            raise ValueError(
                f"model.norm_eps={norm_eps!r} must be > 0 and model.freq_shift={freq_shift!r} in "
                f"[0, {width // 2}) (half the embedding width)"
            )
        self.sin_first, self.freq_shift = bool(sin_first), float(freq_shift)
        self.image_size = image_size
        self.in_channels = in_channels
        emb_dim = 4 * width
        self.width = width
        self.time_mlp = nn.Sequential(
            nn.Linear(width, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.input_conv = nn.Conv2d(in_channels, width, 3, padding=1)

        def res(c_in: int, c_out: int) -> ResBlock:
            return ResBlock(c_in, c_out, emb_dim, dropout, norm_groups, norm_eps)

        def attn(level: int, c: int) -> nn.Module:
            return (
                AttentionBlock(c, num_heads, norm_groups, norm_eps)
                if level in attention_levels
                else nn.Identity()
            )

        skip_channels = [width]
        ch = width
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(res(ch, width * mult))
                ch = width * mult
                attns.append(attn(level, ch))
                skip_channels.append(ch)
            self.down.append(_Level(blocks, attns))
            last = level == len(channel_mult) - 1
            self.downsample.append(nn.Identity() if last else Downsample(ch, downsample_padding))
            if not last:
                skip_channels.append(ch)

        self.mid_block1 = res(ch, ch)
        self.mid_attn = AttentionBlock(ch, num_heads, norm_groups, norm_eps)
        self.mid_block2 = res(ch, ch)

        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(res(ch + skip_channels.pop(), width * mult))
                ch = width * mult
                attns.append(attn(level, ch))
            self.up.append(_Level(blocks, attns))
            self.upsample.append(Upsample(ch) if level > 0 else nn.Identity())

        out_channels = in_channels if out_channels is None else out_channels
        self.out = nn.Sequential(
            _norm(ch, norm_groups, norm_eps),
            nn.SiLU(),
            _zero(nn.Conv2d(ch, out_channels, 3, padding=1)),
        )
        # last, so that an unconditional network draws its initial weights exactly as before
        self.num_classes = num_classes
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        # cross-attention beside each self-attention (also last, for the same reason)
        if not isinstance(context_dim, int) or isinstance(context_dim, bool) or context_dim < 0:
            raise ValueError(f"model.context_dim={context_dim!r} must be an integer >= 0")
        self.context_dim = context_dim
        self.cross = None
        if context_dim:

            def cross(attn: nn.Module) -> nn.Module:
                if isinstance(attn, nn.Identity):
                    return nn.Identity()
                c = attn.norm.num_channels
                return CrossAttention(c, context_dim, num_heads, norm_groups, norm_eps)

            self.cross = nn.ModuleDict({
                "down": nn.ModuleList(nn.ModuleList(map(cross, lvl.attns)) for lvl in self.down),
                "mid": cross(self.mid_attn),
                "up": nn.ModuleList(nn.ModuleList(map(cross, lvl.attns)) for lvl in self.up),
            })  # fmt: skip

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        emb = self.time_mlp(
            timestep_embedding(t, self.width, sin_first=self.sin_first, freq_shift=self.freq_shift)
        )
        if self.class_emb is not None:
            if y is None:  # the null class ∅
                y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.class_emb(y)
        elif y is not None:
            raise ValueError("labels given to an unconditional network (model.num_classes=0)")
        if (context is None) != (self.cross is None):
            raise ValueError(
                "a context needs cross-attention (model.context_dim > 0), and such a network "
                "needs one"
                if context is not None
                else "this network needs a context (a prompt)"
            )

        def attend(attn: nn.Module, cross: nn.Module | None, h: torch.Tensor) -> torch.Tensor:
            """Self-attention, then cross-attention to the context where there is one."""
            h = attn(h)
            if cross is None or isinstance(cross, nn.Identity):
                return h
            return cross(h, context, context_mask)

        none = {"down": [[None] * len(lvl.attns) for lvl in self.down], "mid": None,
                "up": [[None] * len(lvl.attns) for lvl in self.up]}  # fmt: skip
        cross = self.cross if self.cross is not None else none
        h = self.input_conv(x)
        skips = [h]
        for i, (level, down) in enumerate(zip(self.down, self.downsample, strict=True)):
            for j, (block, attn) in enumerate(zip(level.blocks, level.attns, strict=True)):
                h = attend(attn, cross["down"][i][j], block(h, emb))
                skips.append(h)
            if not isinstance(down, nn.Identity):
                h = down(h)
                skips.append(h)
        h = attend(self.mid_attn, cross["mid"], self.mid_block1(h, emb))
        h = self.mid_block2(h, emb)
        for i, (level, up) in enumerate(zip(self.up, self.upsample, strict=True)):
            for j, (block, attn) in enumerate(zip(level.blocks, level.attns, strict=True)):
                h = attend(attn, cross["up"][i][j], block(torch.cat([h, skips.pop()], 1), emb))
            h = up(h)
        return self.out(h)


def check_image_size(image_size: int, num_levels: int) -> None:
    """Reject a size the U-Net cannot halve ``num_levels - 1`` times, naming sizes that work."""
    factor = 2 ** (num_levels - 1)
    if image_size < factor or image_size % factor:
        lower = max(factor, image_size // factor * factor)
        raise ValueError(
            f"image_size={image_size} is not divisible by {factor}, the U-Net's down-sampling "
            f"factor ({num_levels} levels in channel_mult); use a multiple of {factor} such as "
            f"{lower} or {lower + factor}, or change model.channel_mult"
        )
