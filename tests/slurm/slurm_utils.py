"""Helpers for the SLURM tests: the test cluster's client side, free ports, job overrides."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from training_utils import fast_overrides, make_shards

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = REPO / "slurm" / "local_cluster.sh"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def free_port_block(count: int, first: int = 16817, last: int = 19999) -> int:
    """The first port p in [first, last] with p .. p+count-1 all free (slurmctld + one slurmd per node)."""
    for start in range(first, last - count, count + 3):
        try:
            for port in range(start, start + count):
                with socket.socket() as sock:
                    sock.bind(("0.0.0.0", port))
        except OSError:
            continue
        return start
    raise RuntimeError(f"no {count} free consecutive ports in {first}-{last}")


@dataclass
class SlurmCluster:
    """Client side of the test cluster: environment for SLURM commands and job helpers."""

    base: Path
    env: dict[str, str]

    def run(self, *command: str, timeout: float = 120, env: dict[str, str] | None = None):
        """Run a command against the cluster (SLURM_CONF set); returns the CompletedProcess."""
        return subprocess.run(
            list(command),
            cwd=REPO,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def submit(self, overrides: list[str], job_root: Path, nodes: int = 1, name: str = "sgm") -> str:
        """slurm/submit.sh on CPU (GPUS_PER_NODE=0, one task per node); returns the job id."""
        env = {"NODES": str(nodes), "GPUS_PER_NODE": "0", "SGM_JOB_ROOT": str(job_root), "JOB_NAME": name}
        result = self.run("bash", "slurm/submit.sh", "--", *overrides, env=env)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as key -> value (SLURM keeps ended jobs for MinJobAge = 300 s)."""
        result = self.run("scontrol", "show", "job", "-o", job_id)
        assert result.returncode == 0, result.stderr
        return dict(re.findall(r"(\w+)=(\S*)", result.stdout))

    def wait(self, job_id: str, timeout: float = 600) -> dict[str, str]:
        """Wait until the job ended (a requeued job runs again first); returns its final record."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in FINAL_STATES:
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {info.get('JobState')} after {timeout} s:\n{self.log(info)}")
            time.sleep(1)

    @staticmethod
    def log(info: dict[str, str], tail: int = 6000) -> str:
        """The end of a job's output file (for assertion messages)."""
        path = Path(info.get("StdOut", ""))
        return path.read_text()[-tail:] if path.is_file() else f"(no output file {path})"


def job_overrides(shards: Path, max_steps: int, every: int, *extra: str) -> list[str]:
    """The fast tiny-run overrides without run_dir: slurm/train.sbatch gives each job its own folder."""
    base = [
        item for item in fast_overrides(Path("unused"), shards, max_steps, every) if not item.startswith("run_dir=")
    ]
    return [*base, "samples.at_train_end=false", *extra]


# -- session fixtures (imported by the test modules: a tests/slurm/conftest.py would shadow tests/conftest.py,
# which the other test files import as `conftest`) ---------------------------------------------------------


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> Iterator[SlurmCluster]:
    """A real cluster (slurm/local_cluster.sh: one controller, nodes n1 and n2 on 127.0.0.1) for the session;
    stops exactly its own daemons at the end; skips, saying why, where SLURM cannot be installed."""
    base = tmp_path_factory.mktemp("slurm_cluster")
    env = {**os.environ, "SGM_SLURM_NODES": "2", "SGM_SLURM_PORT": str(free_port_block(3))}
    up = subprocess.run(
        ["bash", str(CLUSTER_SCRIPT), "up", str(base)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if up.returncode == 3:
        pytest.skip(f"no SLURM cluster for these tests: {up.stderr.strip()}")
    try:
        assert up.returncode == 0, f"slurm/local_cluster.sh up failed:\n{up.stdout}\n{up.stderr}"
        client_env = {
            **os.environ,
            "SLURM_CONF": str(base / "etc" / "slurm.conf"),
            "PYTHON": sys.executable,
            "HF_HUB_OFFLINE": "1",
            "WANDB_MODE": "offline",
            "PYTHONUNBUFFERED": "1",
        }
        yield SlurmCluster(base, client_env)
    finally:
        subprocess.run(
            ["bash", str(CLUSTER_SCRIPT), "down", str(base)], env=env, capture_output=True, timeout=300, check=False
        )


@pytest.fixture(scope="session")
def slurm_shards(tmp_path_factory) -> Path:
    """Real emoji demo shards: 4 shards, enough for 2 ranks."""
    return make_shards(tmp_path_factory.mktemp("slurm_shards"), num_samples=32, num_emoji=4, samples_per_shard=8)
