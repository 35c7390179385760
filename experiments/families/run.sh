#!/usr/bin/env bash
# One short run per family on the real MNIST images (../shared/data/mnist-t10k, offline), then a
# 36-sample grid from each with the family's default sampler. Times go to times.tsv.
# Usage: ./run.sh [steps]     (default 400 steps of batch 64)
set -euo pipefail
cd "$(dirname "$0")"
STEPS=${1:-400}
SHARED=${SHARED:-../../../shared/data/mnist-t10k}
python ../fid_vs_nfe/prepare_data.py "$SHARED" data
: > times.tsv
for process in ddpm vp_sde subvp_sde ve_sde ncsn; do
  extra=()
  [ "$process" = ve_sde ] && extra=(process.sigma_max=40)  # ~ the largest MNIST pairwise distance
  start=$(date +%s)
  python -m diffusion.train data=mnist data.root=data data.num_workers=0 data.pin_memory=false \
    data.val_fraction=0.02 data.batch_size=64 model=unet_small "process=$process" "${extra[@]}" \
    optimizer.lr=1e-3 module.warmup_steps=200 module.ema_decay=0.999 \
    trainer.max_steps="$STEPS" trainer.val_check_interval=200 trainer.log_every_n_steps=50 \
    callbacks.sample_grid.every_n_steps=0 callbacks.sample_grid.strip_n=0 \
    logger=csv hydra.run.dir="run/$process"
  trained=$(date +%s)
  python -m diffusion.sample ckpt="run/$process/checkpoints/last.ckpt" n=36 batch_size=36 seed=0 \
    out_dir="run/$process/grid" strip_n=0
  cp "run/$process/grid/grid.png" "$process.png"
  done_at=$(date +%s)
  nfe=$(python -c "import json; print(json.load(open('run/$process/grid/info.json'))['nfe'])")
  printf '%s\t%s\t%s\t%s\n' "$process" $((trained - start)) $((done_at - trained)) "$nfe" >> times.tsv
done
cat times.tsv
