"""The speed options keep the numbers: attention layout, channels_last, torch.compile; and the
benchmark script runs end to end (its smoke profile, without the optional peers)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusion.nn import UNet
from diffusion.nn.unet import AttentionBlock
from diffusion.training.module import DiffusionModule

from conftest import compose_train

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_attention_is_softmax_qk_v_per_head(memory_format):
    torch.manual_seed(0)
    block = AttentionBlock(channels=12, num_heads=3, groups=4)
    torch.nn.init.normal_(block.proj.weight, std=0.2)  # zero-initialised: make it count
    x = torch.randn(2, 12, 5, 3)
    out = block(x.contiguous(memory_format=memory_format))
    # reference: channel c of the qkv conv is (i, head, j) with c = (i * heads + head) * d + j
    qkv = block.qkv(block.norm(x)).reshape(2, 3, 3, 4, 15)  # (B, q/k/v, heads, d, HW)
    q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # (B, heads, HW, d)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(4), dim=-1)
    h = (weights @ v).transpose(-1, -2).reshape(2, 12, 5, 3)
    torch.testing.assert_close(out, x + block.proj(h), rtol=1e-5, atol=1e-5)


def test_channels_last_network_computes_the_same_function():
    torch.manual_seed(0)
    net = UNet(16, 1, width=8, channel_mult=(1, 2), norm_groups=4).eval()
    for p in net.parameters():  # the zero-initialised output conv would hide differences
        torch.nn.init.normal_(p, std=0.1)
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([0, 5, 19])
    expected = net(x, t)
    net.to(memory_format=torch.channels_last)
    torch.testing.assert_close(
        net(x.contiguous(memory_format=torch.channels_last), t), expected, rtol=1e-4, atol=1e-5
    )


def test_in_place_blocks_compute_what_out_of_place_ones_did():
    """The in-place additions and dropout against the out-of-place blocks they replaced
    (kept in the benchmark as its "before"): same output, same gradients, same dropout."""
    import copy

    from experiments.performance.bench.variants import earlier_blocks

    torch.manual_seed(0)
    net = UNet(16, 1, width=8, channel_mult=(1, 2), norm_groups=4, dropout=0.3).train()
    for p in net.parameters():  # the zero-initialised convs would hide differences
        torch.nn.init.normal_(p, std=0.1)
    before = copy.deepcopy(net)
    earlier_blocks(before, None, out_of_place=True)
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([0, 5, 19])
    outputs = []
    for model in (net, before):
        torch.manual_seed(1)
        out = model(x, t)
        out.square().mean().backward()
        outputs.append(out)
    torch.testing.assert_close(outputs[0], outputs[1])
    for (name, p), q in zip(net.named_parameters(), before.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def _module(tiny, **module) -> DiffusionModule:
    cfg = compose_train([*tiny, *(f"module.{k}={v}" for k, v in module.items())])
    from hydra.utils import instantiate

    return instantiate(cfg.module)


@pytest.mark.parametrize("channels_last", [True, False])
def test_memory_format_option_holds_through_training_and_sampling(tiny, channels_last):
    module = _module(tiny, channels_last=channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    conv = module.net.input_conv.weight
    assert conv.is_contiguous(memory_format=fmt)
    x0 = torch.rand(4, 1, 16, 16) * 2 - 1
    loss = module.training_step(x0, 0)
    assert torch.isfinite(loss)
    module.sample(2, generator=torch.Generator().manual_seed(0))
    # sampling runs channels_last and gives the weights back in the training format
    assert module.net.input_conv.weight.is_contiguous(memory_format=fmt)
    assert module.ema.module.input_conv.weight.is_contiguous(memory_format=fmt)


def test_compiled_training_matches_eager_and_saves_one_copy(tiny):
    eager = _module(tiny, compile=False, channels_last=False)
    compiled = _module(tiny, compile=True, channels_last=False)
    compiled.net.load_state_dict(eager.net.state_dict())
    x0 = torch.rand(4, 1, 16, 16) * 2 - 1
    eager.eval(), compiled.eval()  # no dropout: the same seeded t and ε, the same loss
    torch.testing.assert_close(
        compiled.training_step(x0, 0), eager.training_step(x0, 0), rtol=1e-4, atol=1e-6
    )
    assert set(compiled.state_dict()) == set(eager.state_dict())


def test_benchmark_smoke_profile_runs_every_section(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.performance.bench", "--profile", "smoke",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    paths = {(r["network"], r["path"]) for r in results["training"]}
    assert {("ours", "bare loop"), ("ours", "Trainer.fit")} <= paths
    for row in results["training"]:
        assert row["images_per_s"] > 0 and row["gflop_per_step"] > 0 and row["peak_mb"] > 0
        assert row["steps_timed"] == 2
    variants = {r["variant"] for r in results["variants"]}
    assert variants >= {"default", "EMA Python loop", "loss through diffusion's Objective"}
    nfe = {(r["sampler"], r["target_nfe"]): r["nfe"] for r in results["sampling"]}
    assert nfe[("ddim", 2)] == nfe[("dpm_solver", 2)] == nfe[("ddpm", 2)] == 2
    assert nfe[("annealed_langevin", 2)] == 11  # 10 noise levels x 1 step + the final denoise
    assert "| ours | Trainer.fit |" in (tmp_path / "results.md").read_text()
    design = {r["sampler"]: r for r in results["sampling"] if "vs_previous_design" in r}
    assert set(design) == {"ddim", "ddpm"}
    assert all(r["vs_previous_design"] > 0 for r in design.values())
    if sys.platform.startswith("linux"):  # glibc keeps freed memory: on, and off for comparison
        assert results["machine"]["keep_freed_memory"] is True
        assert {r["keep"] for r in results["allocator"]} == {True, False}
        assert all(r["step_ms"] > 0 and r["rss_mb"] > 0 for r in results["allocator"])
