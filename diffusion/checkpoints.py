"""Loading checkpoints with clear errors instead of pickle tracebacks."""

from __future__ import annotations

from pathlib import Path

import torch

from diffusion.errors import UserError


def load_module(path: str | Path, device: torch.device | str = "cpu"):
    """The :class:`~diffusion.module.DiffusionModule` at ``path``, in eval mode on ``device``."""
    from diffusion.module import DiffusionModule

    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist")
    try:
        module = DiffusionModule.load_from_checkpoint(path, map_location=torch.device(device))
    except (RuntimeError, EOFError, OSError, KeyError, ValueError) as err:
        raise UserError(
            f"cannot load checkpoint {str(path)!r}: it is truncated, corrupt or not a checkpoint "
            f"of diffusion.train ({type(err).__name__}: {str(err)[:200]})"
        ) from None
    return module.eval()
