#!/usr/bin/env bash
# A small beta-schedule sweep on the bundled digits (offline): the quickstart recipe cut to 400
# steps, one run per schedule, then the report table. ~2 min per schedule alone on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")"
python -m diffusion.train experiment=schedule_sweep trainer.max_steps=400 \
  trainer.val_check_interval=200 callbacks.sample_grid.every_n_steps=0 \
  hydra.sweep.dir=sweep
python -m diffusion.report sweep
cp sweep/report.md sweep/report.png .
