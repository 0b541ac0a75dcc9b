"""Multi-host start-up: `jax.distributed.initialize` from the environment when there is one."""
from __future__ import annotations

import os

import jax

_ENV_HINTS = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES",
              "MEGASCALE_COORDINATOR_ADDRESS")


def initialize_from_env() -> bool:
  """Initialises jax.distributed on a TPU pod, under SLURM, or with explicit coordinator env.

  Explicit: JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES, JAX_PROCESS_ID. A single
  process with none of these set does nothing and returns False.
  """
  if not any(k in os.environ for k in _ENV_HINTS):
    return False
  if os.environ.get("SLURM_NTASKS") == "1" and "JAX_COORDINATOR_ADDRESS" not in os.environ:
    return False
  kwargs = {}
  if "JAX_COORDINATOR_ADDRESS" in os.environ:
    kwargs = {"coordinator_address": os.environ["JAX_COORDINATOR_ADDRESS"],
              "num_processes": int(os.environ["JAX_NUM_PROCESSES"]),
              "process_id": int(os.environ["JAX_PROCESS_ID"])}
  jax.distributed.initialize(**kwargs)
  return True
