"""Scaling out, as far as this machine can: DDP on 2 CPU processes (alone and inside a Hydra
multirun), resume under DDP, the joblib launcher, an Optuna search, and the SLURM launcher's
job script."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import yaml
from lightning import Callback

from conftest import TINY, run_cli

TESTS = Path(__file__).parent
ENV = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
       "OMP_NUM_THREADS": "1"}  # fmt: skip


class RankDump(Callback):
    """Saves each rank's weights, EMA and the sums of the batches it trained on."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.batch_sums: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.batch_sums.append(float(batch.float().sum()))

    def on_train_end(self, trainer, module) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        state = {"net": module.net.state_dict(), "ema": module.ema.state_dict(),
                 "batches": self.batch_sums, "world_size": trainer.world_size}  # fmt: skip
        torch.save(state, self.dirpath / f"rank{trainer.global_rank}.pt")


def _dump(path: Path) -> str:
    return f"+callbacks.rank_dump={{_target_:test_scale.RankDump,dirpath:'{path}'}}"


def _assert_ranks_agree(dump_dir: Path) -> None:
    ranks = [torch.load(dump_dir / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    for key in ("net", "ema"):
        for name, value in ranks[0][key].items():
            assert torch.equal(value, ranks[1][key][name]), f"{key}.{name} differs between ranks"
    assert ranks[0]["batches"] != ranks[1]["batches"]  # each rank trains on its own shard


def test_ddp_in_a_multirun_keeps_ranks_identical_one_directory_per_point_and_resumes(tmp_path):
    """Two sweep points, each DDP on two CPU processes; then one point resumed in place, under
    DDP again (the ranks' processes must find the job's folder, not make their own)."""
    ddp = ["trainer=ddp_cpu", "trainer.accelerator=cpu"]
    args = ["-m", "schedule=linear,cosine", *TINY, *ddp,
            _dump(tmp_path / "dump" / "${schedule._target_}")]  # fmt: skip
    proc = run_cli(args, cwd=tmp_path, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweeps = list((tmp_path / "outputs" / "multiruns").iterdir())
    assert len(sweeps) == 1 and not (tmp_path / "outputs" / "runs").exists()
    jobs = sorted(p.name for p in sweeps[0].iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    for job in jobs:
        assert (sweeps[0] / job / "checkpoints" / "last.ckpt").is_file()
        result = yaml.safe_load((sweeps[0] / job / "result.json").read_text())
        assert result["world_size"] == 2 and result["effective_batch_size"] == 2 * 8
    for schedule in ("linear", "cosine"):
        _assert_ranks_agree(tmp_path / "dump" / f"diffusion.processes.schedules.{schedule}")
    # resume the second point in place under DDP, for two more steps
    job = sweeps[0] / "1"
    resume = ["schedule=cosine", *TINY, *ddp, "trainer.max_steps=6", "ckpt_path=last",
              f"hydra.run.dir={job}", _dump(tmp_path / "resumed")]  # fmt: skip
    resumed = run_cli(resume, cwd=tmp_path, env=ENV, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ckpt = torch.load(job / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 6
    _assert_ranks_agree(tmp_path / "resumed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dump", "outputs", "resumed"]


def test_parallel_launcher_runs_the_points_in_worker_processes(tmp_path):
    proc = run_cli(["-m", "hydra/launcher=parallel", "schedule=linear,cosine", *TINY],
                   cwd=tmp_path, env=ENV, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "multiruns").iterdir()
    for job in ("0", "1"):
        assert (sweep / job / "result.json").is_file()
    assert "Joblib" in proc.stdout + proc.stderr


def test_optuna_search_minimises_the_returned_validation_loss(tmp_path):
    args = ["hparams_search=optuna_lr", "hydra.sweeper.n_trials=2", *TINY]
    proc = run_cli(args, cwd=tmp_path, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "multiruns").iterdir()
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    losses = [yaml.safe_load((sweep / j / "result.json").read_text())["metrics"]["val/loss"]
              for j in ("0", "1")]  # fmt: skip
    assert best["best_value"] == min(losses)
    # module.warmup_steps is fixed by TINY on the command line, which wins over the search space
    assert set(best["best_params"]) == {"optimizer.lr", "module.ema_decay"}


def test_slurm_launcher_composes_and_writes_the_right_job_script(tmp_path):
    """No cluster here: compose the launcher and render the sbatch script submitit would send."""
    from hydra import compose, initialize_config_module
    from submitit.slurm.slurm import _make_sbatch_string

    with initialize_config_module("diffusion.conf", version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["hydra/launcher=slurm", "hydra.launcher.partition=a100",
                       "hydra.launcher.gpus_per_node=4", "hydra.launcher.nodes=2",
                       "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"],
            return_hydra_config=True,
        )  # fmt: skip
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.tasks_per_node == 4 == cfg.trainer.devices  # one task per GPU, for Lightning
    script = _make_sbatch_string(
        "python -m diffusion.train", tmp_path, partition=launcher.partition,
        nodes=launcher.nodes, gpus_per_node=launcher.gpus_per_node,
        ntasks_per_node=launcher.tasks_per_node, cpus_per_task=launcher.cpus_per_task,
        mem=f"{launcher.mem_gb}GB", time=launcher.timeout_min,
        signal_delay_s=launcher.signal_delay_s,
    )  # fmt: skip
    expected = ["--partition=a100", "--nodes=2", "--gpus-per-node=4", "--ntasks-per-node=4",
                "--time=1440", "--mem=64GB", "--signal=USR2@300"]  # fmt: skip
    for flag in expected:
        assert f"#SBATCH {flag}" in script, (flag, script)
    assert "srun" in script and "python -m diffusion.train" in script
