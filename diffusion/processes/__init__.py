"""Processes: how data becomes noise. Every family is a Gaussian kernel x_t = m(t) x_0 + σ(t) ε
with a network time label (kernel.py), offering the views its samplers need: DDPM (ddpm.py, with
its β schedules in schedules.py), the score SDEs (sde.py) and NCSN's levels (ncsn.py). What a
network predicts, and its conversion to ε̂, x̂_0, score and v̂, is prediction.py; closed-form
optimal networks for Gaussian data, which check everything else, are analytic.py."""
