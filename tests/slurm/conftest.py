"""The SLURM tests' session fixtures (a local cluster, shards on its shared disk), found by pytest here."""

from slurm_utils import slurm_cluster, slurm_shards

__all__ = ["slurm_cluster", "slurm_shards"]
