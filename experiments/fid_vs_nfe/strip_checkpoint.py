"""The checkpoint the benchmarks read: a run's last.ckpt without its optimizer state (the
weights, EMA and hyperparameters are all ``bench.py`` needs).

    python strip_checkpoint.py run/checkpoints/last.ckpt checkpoint.ckpt
"""

import sys

import torch

KEEP = ("state_dict", "hyper_parameters", "hparams_name", "beta", "global_step", "epoch",
        "pytorch-lightning_version")  # fmt: skip

if __name__ == "__main__":
    source, target = sys.argv[1:3]
    ckpt = torch.load(source, weights_only=True)
    torch.save({k: ckpt[k] for k in KEEP if k in ckpt}, target)
    print(f"wrote {target}")
