"""Multi-process start-up: `jax.distributed.initialize` when launched as one of several processes."""
from __future__ import annotations

import os

import jax

# Variables set by the launchers jax.distributed auto-detects (SLURM, Open MPI, TPU pods) or by hand.
LAUNCH_VARIABLES = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                    "MEGASCALE_COORDINATOR_ADDRESS")


def maybe_initialize_distributed() -> None:
    """Initialises the JAX distributed runtime when a multi-process launch is detected; no-op otherwise.

    By hand: JAX_COORDINATOR_ADDRESS=host:port JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i.
    """
    if not any(os.environ.get(name) for name in LAUNCH_VARIABLES):
        return
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                                   process_id=int(os.environ["JAX_PROCESS_ID"]))
    else:
        jax.distributed.initialize()
