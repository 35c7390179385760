"""Keep W&B from ever prompting or blocking: run offline unless credentials are available."""

from __future__ import annotations

import logging
import netrc
import os

log = logging.getLogger(__name__)


def has_wandb_credentials() -> bool:
    """True when an API key is in the environment or in ~/.netrc (what ``wandb login`` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators(
            os.environ.get("WANDB_BASE_URL", "api.wandb.ai").split("//")[-1]
        )
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(auth and auth[2])


def ensure_wandb_never_blocks() -> str:
    """Set ``WANDB_MODE=offline`` without a chosen mode or credentials; return the mode."""
    mode = os.environ.get("WANDB_MODE")
    if not mode:
        mode = "online" if has_wandb_credentials() else "offline"
        if mode == "offline":
            log.info("W&B: no credentials found, logging offline (upload later with `wandb sync`)")
        os.environ["WANDB_MODE"] = mode
    os.environ.setdefault("WANDB_SILENT", "true")
    return mode
