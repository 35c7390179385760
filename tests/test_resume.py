"""Exact resume: N steps straight give the same bits as N/2 steps, a checkpoint, and a resumed run
of the other N/2, including data order across an epoch boundary, flips, dropout, t and ε."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from diffusion.errors import UserError
from diffusion.train import train
from diffusion.training.determinism import ResumableSampler, mix, seeded

from conftest import TINY, compose_train

# About 36 training images in batches of 8: 4 batches per epoch, so 10 steps cross two epoch
# boundaries and the step-5 checkpoint lies inside epoch 1.
RESUMABLE = [
    *TINY,
    "data.val_fraction=0.98",
    "data.hflip=true",
    "model.dropout=0.1",
    "trainer.max_steps=10",
    "callbacks.checkpoint.monitor=null",
    "callbacks.checkpoint.save_top_k=-1",
    "callbacks.checkpoint.every_n_train_steps=5",
    "callbacks.checkpoint.filename='step_{step}'",
    "callbacks.sample_grid.every_n_steps=3",
]


def _final_state(out, extra=()):
    train(compose_train([*RESUMABLE, *extra], out))
    return torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def _assert_bitwise_equal(a, b, where="checkpoint"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_bitwise_equal(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_bitwise_equal(x, y, f"{where}[{i}]")


def test_half_plus_resumed_half_equals_straight_run_bitwise(tmp_path):
    straight = _final_state(tmp_path / "straight")
    half = tmp_path / "straight" / "checkpoints" / "step_5.ckpt"
    assert torch.load(half, weights_only=False)["global_step"] == 5
    resumed = _final_state(tmp_path / "resumed", [f"ckpt_path={half}"])
    assert resumed["global_step"] == straight["global_step"] == 10
    assert resumed["epoch"] == straight["epoch"]
    _assert_bitwise_equal(straight["state_dict"], resumed["state_dict"], "weights")  # + EMA
    _assert_bitwise_equal(
        straight["optimizer_states"], resumed["optimizer_states"], "optimizer state"
    )
    _assert_bitwise_equal(straight["lr_schedulers"], resumed["lr_schedulers"], "lr schedule")
    assert straight["batches_seen"] == resumed["batches_seen"] == 10


def test_a_different_seed_trains_different_weights(tmp_path):
    """The comparison above can fail: the training randomness reaches the weights."""
    a = _final_state(tmp_path / "a", ["trainer.max_steps=3"])
    b = _final_state(tmp_path / "b", ["trainer.max_steps=3", "seed=1"])
    assert not torch.equal(
        a["state_dict"]["net.input_conv.weight"], b["state_dict"]["net.input_conv.weight"]
    )


def test_resumable_sampler_skips_the_consumed_part_of_its_epoch_only():
    data = list(range(20))
    full = ResumableSampler(data, num_replicas=2, rank=1, seed=3)
    full.set_epoch(4)
    order = list(full)
    rank0 = ResumableSampler(data, num_replicas=2, rank=0, seed=3)
    rank0.set_epoch(4)
    assert sorted(order + list(rank0)) == data and order != sorted(order)  # shuffled shards
    part = ResumableSampler(data, num_replicas=2, rank=1, seed=3)
    part.resume_at(4, 6)
    part.set_epoch(4)
    assert list(part) == order[6:]
    assert list(part) == order  # the next pass is whole again
    other = ResumableSampler(data, num_replicas=2, rank=1, seed=3)
    other.resume_at(3, 6)  # a checkpoint from another epoch skips nothing
    other.set_epoch(4)
    assert list(other) == order


def test_seeded_draws_are_a_function_of_the_seed_and_leave_the_global_state_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    with seeded(mix(0, 7, 0)):
        a = torch.randn(5)
    with seeded(mix(0, 7, 0)):
        b = torch.randn(5)
    with seeded(mix(0, 8, 0)):
        c = torch.randn(5)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_mix_gives_distinct_63_bit_seeds_for_nearby_keys():
    keys = [(seed, batch, rank) for seed in range(3) for batch in range(50) for rank in range(4)]
    seeds = [mix(*k) for k in keys]
    assert len(set(seeds)) == len(keys) and all(0 <= s < 2**63 for s in seeds)


def test_resuming_from_a_checkpoint_of_another_model_config_fails_clearly(tmp_path):
    """Caught before anything is built; the checkpoint is not touched."""
    out = tmp_path / "run"
    train(compose_train([*TINY, "trainer.max_steps=2"], out))
    ckpt = out / "checkpoints" / "last.ckpt"
    before = ckpt.read_bytes()
    args = [*TINY, "model.width=16", "T=30", f"ckpt_path={ckpt}"]
    with pytest.raises(UserError) as info:
        train(compose_train(args, tmp_path / "r"))
    message = str(info.value)
    assert "was trained with another configuration: model.width: checkpoint 8, config 16" in message
    assert "T: checkpoint 20, config 30" in message
    assert not (tmp_path / "r").exists() and ckpt.read_bytes() == before
    # in place with ckpt_path=last: the same check on the run's own last.ckpt
    with pytest.raises(
        UserError, match=r"model.channel_mult: checkpoint \[1, 2\], config \[1, 1\]"
    ):
        train(compose_train([*TINY, "model.channel_mult=[1,1]", "ckpt_path=last"], out))
    assert ckpt.read_bytes() == before


def test_resuming_a_checkpoint_of_another_family_fails_clearly(tmp_path):
    from diffusion.checkpoints import check_resumable

    out = tmp_path / "run"
    train(compose_train([*TINY, "trainer.max_steps=1"], out))
    ckpt = out / "checkpoints" / "last.ckpt"
    same = compose_train([*TINY]).module
    check_resumable(ckpt, OmegaConf.to_container(same, resolve=True))
    other = compose_train([*TINY, "process=ncsn"]).module
    with pytest.raises(UserError, match=r"process: checkpoint 'ddpm', config \{'_target_'"):
        check_resumable(ckpt, OmegaConf.to_container(other, resolve=True))
