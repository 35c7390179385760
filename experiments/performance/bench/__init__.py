"""Training and sampling speed, against diffusers and lucidrains in the same run (`make bench`).

Training: images per second (median step after warm-up) of our U-Nets through the real
``Trainer.fit`` path (the project's config, data module and LightningModule) and through a bare
PyTorch loop with the same network, batch, L_simple, AdamW, gradient clipping and EMA; the same
bare loop with diffusers' ``UNet2DModel`` and lucidrains' ``Unet`` at matched size (peers.py).
FLOPs per step (``torch.utils.flop_counter``) give the achieved GFLOP/s, also as a fraction of
the machine's dense float32 matmul rate measured at the start. Peak memory a step adds: bytes
allocated through malloc on the CPU (glibc's mallinfo2, polled), ``max_memory_allocated`` on a
GPU.

Optimisations, each against its alternative in this run: memory format, AdamW implementation,
EMA update, dropout mask, in-place additions, attention layout, torch.compile, bf16 autocast.
The host allocator: glibc keeping freed memory (``keep_freed_memory``, on in diffusion.train
and so in this whole process, peers included) against glibc's default, a process each.
Sampling: seconds per 64 images per sampler and NFE, and the time outside the network as a
fraction of the time inside it.

    python -m experiments.performance.bench                 # the CPU profile (make bench)
    python -m experiments.performance.bench --profile full  # the whole protocol (~1 h on 2 cores)
    python -m experiments.performance.bench --profile smoke # seconds; what the tests run

Writes results.json and results.md to experiments/performance/ (or to --out). One module per
job: profiles (what a run measures), measure (clocks, memory, FLOPs), training (the bare loop and
Trainer.fit, against the peers of peers.py), variants (each optimisation against its
alternative, and the design's own cost), allocator (keep_freed_memory, a process each),
sampling (seconds and overhead per sampler), report (the markdown), __main__ (the command).
"""

from __future__ import annotations
