"""Training: the LightningModule (module.py) and its objective (objective.py: prediction target
and loss weighting, weighting.py), weight averaging (ema.py), data (data.py), per-batch seeds and
resumable data order (determinism.py), and callbacks (sample grids, FID, pre-emption)."""
