"""Evaluation: FID/KID/IS (metrics.py), bits/dim from DDPM's bound (likelihood.py) and from the
probability-flow ODE (ode_likelihood.py), drawing samples in batches (draw.py), and pictures of
the process (plots.py)."""
