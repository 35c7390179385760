"""keep_freed_memory: freed blocks stay in the process (glibc), and train() applies it on CPU."""

from __future__ import annotations

import subprocess
import sys

import pytest

from diffusion import train as train_module
from diffusion.train import train

from conftest import compose_train

# A training step in small: two large tensors allocated, written and freed, ten times over;
# prints whether it applied, the page faults of the last two steps and the RSS (MB) after them.
PROBE = """
import resource, sys, torch
from diffusion.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

base = rss()
for step in range(10):
    if step == 8:  # steady state: glibc's free lists have settled
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x, y = torch.ones(64 * 2**20), torch.ones(16 * 2**20)  # 256 MB and 64 MB
    del x, y
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
print(applied, faults, rss() - base)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux")
def test_freed_memory_stays_and_later_steps_do_not_fault_it_in_again():
    def probe(mode: str) -> tuple[str, int, float]:
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True,
                             text=True, check=True).stdout.split()  # fmt: skip
        return out[0], int(out[1]), float(out[2])

    applied, kept_faults, kept_mb = probe("keep")
    _, default_faults, default_mb = probe("default")
    if applied != "True":
        pytest.skip("not glibc")
    # 320 MB is 81920 pages: faulted in at every step by default; kept, at least half are reused
    # (mostly all: memalign's padding can leave one block unplaced for a few more steps)
    assert default_faults > 2 * 70_000 and kept_faults < default_faults / 2
    assert default_mb < 50 < 300 < kept_mb  # given back to the kernel vs kept in the process


@pytest.mark.parametrize("keep", [True, False])
def test_train_keeps_freed_memory_on_the_cpu_when_configured(tiny, tmp_path, monkeypatch, keep):
    calls = []
    monkeypatch.setattr(train_module, "keep_freed_memory", lambda: calls.append(1) or True)
    cfg = compose_train([*tiny, f"keep_freed_memory={keep}", "trainer.max_steps=1",
                         "callbacks.sample_grid=null", "callbacks.fid=null"], tmp_path)  # fmt: skip
    train(cfg)
    assert calls == ([1] if keep else [])
