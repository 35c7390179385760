"""Networks. They know nothing about diffusion: they map (x, t) to a tensor shaped like x."""

from diffusion.nn.unet import UNet

__all__ = ["UNet"]
