"""Multi-host start-up with JAX's own runtime: `jax.distributed.initialize`, once per process.

On a Cloud TPU pod (and under SLURM or Open MPI) JAX finds the coordinator and this process's
index by itself; elsewhere `distributed.coordinator_address`, `num_processes` and `process_id`
say them (e.g. two processes on 127.0.0.1 in the tests).
"""

from __future__ import annotations

import os

import jax
import ml_collections


def _on_multihost_tpu() -> bool:
    """Cloud TPU VMs list every worker of the slice in TPU_WORKER_HOSTNAMES."""
    return len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1


def initialize(dist_cfg: ml_collections.ConfigDict) -> bool:
    """Join the multi-process runtime if the config or the environment says so.

    Must run before anything touches a JAX device. Returns whether this is a multi-process run.
    """
    if jax.distributed.is_initialized():
        return True
    wanted = dist_cfg.initialize == "on" or (
        dist_cfg.initialize == "auto" and (bool(dist_cfg.coordinator_address)
                                          or _on_multihost_tpu()))
    if not wanted:
        return False
    if dist_cfg.coordinator_address:
        jax.distributed.initialize(coordinator_address=dist_cfg.coordinator_address,
                                   num_processes=dist_cfg.num_processes,
                                   process_id=dist_cfg.process_id)
    else:
        jax.distributed.initialize()  # cluster auto-detection (TPU pod, SLURM, Open MPI)
    return True
