#!/usr/bin/env bash
# Train unet_small on the 10k real MNIST test images for the FID-vs-NFE benchmark (~30 min on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")"
SHARED=${SHARED:-../../../shared/data/mnist-t10k}
python prepare_data.py "$SHARED" data
python -m diffusion.train data=mnist data.root=data data.num_workers=0 data.pin_memory=false \
  data.val_fraction=0.02 data.batch_size=64 model=unet_small T=1000 schedule=linear \
  optimizer.lr=1e-3 module.warmup_steps=200 module.ema_decay=0.999 \
  trainer.max_steps=2800 trainer.val_check_interval=700 trainer.log_every_n_steps=50 \
  callbacks.sample_grid.every_n_steps=0 callbacks.sample_grid.strip_n=0 \
  hydra.run.dir=run
# The checkpoint the benchmarks read: the run's last.ckpt without its optimizer state. Training is
# deterministic on the CPU (same seed, same bytes of weights), so this rebuilds the same file.
python strip_checkpoint.py run/checkpoints/last.ckpt checkpoint.ckpt
