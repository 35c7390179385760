"""Hydra configs, shipped inside the package (``pkg://diffusion.conf``)."""
