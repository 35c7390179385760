#!/usr/bin/env bash
# The EDM row of the FID-vs-NFE benchmark (issue #15): train.sh's recipe exactly (unet_small, the
# 10k real MNIST test images, 2,800 steps of batch 64, lr 1e-3 with 200 warm-up steps, EMA 0.999,
# seed 0) with process=edm, which brings EDM's preconditioned denoiser (prediction=edm,
# sigma_data 0.5), ln sigma ~ N(-1.2, 1.2^2) and lambda(sigma). ~30 min on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")"
SHARED=${SHARED:-../../../shared/data/mnist-t10k}
[ -d data/MNIST ] || python prepare_data.py "$SHARED" data
python -m diffusion.train data=mnist data.root=data data.num_workers=0 data.pin_memory=false \
  data.val_fraction=0.02 data.batch_size=64 model=unet_small process=edm \
  optimizer.lr=1e-3 module.warmup_steps=200 module.ema_decay=0.999 \
  trainer.max_steps=2800 trainer.val_check_interval=700 trainer.log_every_n_steps=50 \
  callbacks.sample_grid.every_n_steps=0 callbacks.sample_grid.strip_n=0 \
  hydra.run.dir=run_edm "$@"
# as train.sh: the weights, EMA and hyperparameters without the optimizer state
python strip_checkpoint.py run_edm/checkpoints/last.ckpt checkpoint_edm.ckpt
