"""Real SLURM jobs on the local test cluster: a multi-node DDP job through sbatch, preempted, requeued and
resumed; chained stage submission; and a sweep through the SLURM launcher (all on CPU)."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import pytest
import torch
from slurm_utils import REPO, job_overrides, slurm_cluster, slurm_shards  # noqa: F401 - session fixtures
from training_utils import loader_batch_keys

from sgm.training.callbacks import read_batch_keys
from sgm.training.stages import STAGES, final_weights

pytestmark = pytest.mark.slurm


def load_state(path: Path) -> dict:
    return torch.load(path, weights_only=False, map_location="cpu")


def test_two_node_ddp_job_checkpoints_on_usr1_requeues_and_resumes_with_the_same_batches(
    slurm_cluster, slurm_shards, tmp_path
):
    """A 2-node DDP job through sbatch, preempted mid-run: every rank saves at the same step, the job is
    requeued, and the resumed run continues the step count with the batches an uninterrupted run would
    train on, then finishes and exports. DataLoader workers (num_workers=1) take part: SLURM signals
    every process of the step. The plain multi-node checks (nodes, ranks, rendezvous address, the final
    checkpoint and outputs) are made on this job too, which saves a second job."""
    steps = 6
    overrides = job_overrides(slurm_shards, steps, 3, "log_batch_keys=true", "data.num_workers=1")
    job = slurm_cluster.submit(overrides, tmp_path, nodes=2, name="preempted")
    run_dir = tmp_path / f"preempted-{job}"
    keys_file = run_dir / "batch_keys.tsv"
    deadline = time.monotonic() + 300
    while not (keys_file.is_file() and len(keys_file.read_text().splitlines()) >= 2):  # training has begun
        info = slurm_cluster.job(job)
        assert info["JobState"] in ("PENDING", "RUNNING") and time.monotonic() < deadline, slurm_cluster.log(info)
        time.sleep(0.2)
    signalled = slurm_cluster.run("scancel", "--signal=USR1", job)
    assert signalled.returncode == 0, signalled.stderr
    expected = loader_batch_keys(overrides, rank=0, world_size=2, steps=steps)  # meanwhile: rank 0's batches

    info = slurm_cluster.wait(job)
    log = slurm_cluster.log(info)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert info["NodeList"] == "n[1-2]" and info["NumNodes"] == "2", info
    # the whole output: the requeue's SIGTERM can add a long traceback after the lines checked below
    log = Path(info["StdOut"]).read_text()
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log and "master 127.0.0.1:" in log  # NodeAddr of n1, not the name
    preempted = load_state(run_dir / "checkpoints" / "requeue.ckpt")
    assert 0 < preempted["global_step"] < steps, log
    assert sorted(preempted["SDXLDataModule"]["loader"]["ranks"]) == ["0", "1"]
    assert f"[sgm] preempted at step {preempted['global_step']}: saved {run_dir}/checkpoints/requeue.ckpt" in log
    assert "restart 1:" in log and f"[sgm] resuming from {run_dir}/checkpoints/requeue.ckpt" in log
    last = load_state(run_dir / "checkpoints" / "last.ckpt")
    assert last["global_step"] == steps and sorted(last["SDXLDataModule"]["loader"]["ranks"]) == ["0", "1"]
    assert json.loads((run_dir / "outputs.json").read_text())["global_step"] == str(steps)
    assert read_batch_keys(keys_file) == expected  # every step, before and after the requeue


def test_stages_chained_with_afterok_run_in_order(slurm_cluster, slurm_shards, tmp_path):
    """The first two stages: the dependency mechanism is the same for every link (the chain's sbatch
    arguments for all four: tests/slurm/test_slurm_units.py; the four stages in one run:
    tests/test_training_stages.py)."""
    root, stages = tmp_path / "stages", STAGES[:2]
    overrides = [
        "experiment=tiny_stages",
        f"data.shards={slurm_shards}/*.tar",
        f"demo_data.out={slurm_shards}",
        "threads=1",
        "trainer.max_steps=2",
        "checkpoint.every_n_train_steps=2",
        "samples.at_train_end=false",
    ]
    env = {"NODES": "1", "GPUS_PER_NODE": "0", "SGM_JOB_ROOT": str(tmp_path / "logs")}
    submitted = slurm_cluster.run(
        sys.executable,
        "slurm/submit_stages.py",
        "--root",
        str(root),
        "--stages",
        ",".join(stages),
        "--",
        *overrides,
        env=env,
    )
    assert submitted.returncode == 0, submitted.stderr
    jobs = [line.split() for line in submitted.stdout.splitlines()]
    assert [stage for stage, _ in jobs] == list(stages)
    assert slurm_cluster.job(jobs[1][1])["Dependency"] == f"afterok:{jobs[0][1]}(unfulfilled)"

    infos = [slurm_cluster.wait(job) for _, job in jobs]
    for (stage, _), info in zip(jobs, infos):
        assert info["JobState"] == "COMPLETED", f"{stage}:\n{slurm_cluster.log(info)}"
    for parent, child, parent_info, child_info in zip(stages, stages[1:], infos, infos[1:]):
        assert child_info["StartTime"] >= parent_info["EndTime"]  # ISO times compare as strings
        lineage = json.loads((root / child / "lineage.json").read_text())["parent"]
        weights = final_weights(parent, root)
        assert lineage["path"] == str(weights)  # started from the parent's final weights, as they are now
        assert lineage["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert final_weights(stages[-1], root).is_file()


def test_two_point_sweep_through_the_slurm_launcher(slurm_cluster, slurm_shards, tmp_path):
    run_dir = tmp_path / "sweep"
    command = [
        sys.executable,
        str(REPO / "train.py"),
        "-m",
        "hydra/launcher=slurm",
        "module.lr=1e-4,3e-4",
        f"run_dir={run_dir}",
        *job_overrides(slurm_shards, 2, 2),
    ]
    result = slurm_cluster.run(*command, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    submission = next((run_dir / "multirun" / ".submitit").glob(".submission_file_*.sh")).read_text()
    assert "#SBATCH --array=0-1" in submission and "#SBATCH --signal=USR1@180" in submission
    for number, lr in enumerate((1e-4, 3e-4)):
        job_dir = run_dir / "multirun" / str(number)  # one run_dir per sweep point
        assert json.loads((job_dir / "outputs.json").read_text())["global_step"] == "2"
        optimizer = load_state(job_dir / "checkpoints" / "last.ckpt")["optimizer_states"][0]
        assert optimizer["param_groups"][0]["initial_lr"] == lr
