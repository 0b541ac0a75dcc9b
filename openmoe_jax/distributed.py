"""Multi-host start-up: `jax.distributed.initialize` from flags or the environment.

Where the coordinator comes from, first match wins:
  1. explicit arguments (`initialize(coordinator_address=..., num_processes=..., process_id=...)`);
  2. JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES, JAX_PROCESS_ID (+ optional
     JAX_LOCAL_DEVICE_IDS=0,1,...), as `launch/multi_gpu.py` sets them for one process per GPU;
  3. a cluster JAX detects itself: SLURM with more than one task (srun), a multi-host TPU pod
     slice (TPU_WORKER_HOSTNAMES lists several hosts) or multi-slice (MEGASCALE_*).
A single process with none of these does nothing. Call it before any other JAX call.

After it, `jax.devices()` spans every host; `sharding.make_mesh` keeps each host's devices
contiguous along the batch axes, the data pipeline reads shard `jax.process_index()` of
`jax.process_count()`, `jax.make_array_from_process_local_data` assembles the global batch, and
orbax writes / reads each host's shards of a checkpoint (restorable on any host count).
"""
from __future__ import annotations

import os

import jax

_CLUSTER_HINTS = ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")

# XLA flags for the expert all-to-all, added to XLA_FLAGS unless the user set the same flag.
# With one process driving several GPUs, XLA's in-process ragged all-to-all kernel copies the
# rows peer after peer: on 2 x H200 the expert-parallel step ran at 19.7% scaling efficiency
# with it, 80% with the ragged all-to-all decomposed into dense all-to-alls (docs/scaling.md).
# The flag is known to every XLA backend and changes nothing where no ragged all-to-all runs.
DECOMPOSER_FLAG = "--xla_gpu_unsupported_enable_ragged_all_to_all_decomposer"
DEFAULT_XLA_FLAGS = (f"{DECOMPOSER_FLAG}=true",)


def with_default_xla_flags(flags: str) -> str:
  """`flags` (an XLA_FLAGS value) plus each of DEFAULT_XLA_FLAGS whose name it lacks."""
  names = {f.split("=", 1)[0] for f in flags.split()}
  extra = [f for f in DEFAULT_XLA_FLAGS if f.split("=", 1)[0] not in names]
  return " ".join([flags.strip(), *extra]).strip()


def ragged_all_to_all_decomposed(flags: str | None = None) -> bool:
  """Whether `flags` (default: this process's XLA_FLAGS) turn the decomposer on; the last
  setting wins, as in XLA."""
  flags = os.environ.get("XLA_FLAGS", "") if flags is None else flags
  values = [f.split("=", 1)[1] if "=" in f else "true" for f in flags.split()
            if f.split("=", 1)[0] == DECOMPOSER_FLAG]
  return bool(values) and values[-1].lower() in ("true", "1")


def apply_default_xla_flags() -> None:
  """Sets DEFAULT_XLA_FLAGS in this process's XLA_FLAGS. XLA reads them when the first backend
  starts, so call this before any computation (`initialize` does)."""
  os.environ["XLA_FLAGS"] = with_default_xla_flags(os.environ.get("XLA_FLAGS", ""))


def _env_int(env: dict[str, str], name: str) -> int:
  value = env.get(name)
  try:
    return int(value)  # type: ignore[arg-type]
  except (TypeError, ValueError):
    raise ValueError(f"${name}={value!r}; expected an integer (set with "
                     "JAX_COORDINATOR_ADDRESS for an explicit multi-process launch)") from None


def cluster_detected(env: dict[str, str] | None = None) -> bool:
  """True where jax.distributed can find its coordinator by itself (SLURM, TPU pod, slices)."""
  env = dict(os.environ) if env is None else env
  if int(env.get("SLURM_NTASKS", "1") or "1") > 1:
    return True
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  return len(hosts) > 1 or "MEGASCALE_COORDINATOR_ADDRESS" in env


def explicit_args(env: dict[str, str] | None = None) -> dict[str, object] | None:
  """initialize() arguments from JAX_COORDINATOR_ADDRESS & co., or None if it is unset."""
  env = dict(os.environ) if env is None else env
  if not env.get("JAX_COORDINATOR_ADDRESS"):
    return None
  num, pid = _env_int(env, "JAX_NUM_PROCESSES"), _env_int(env, "JAX_PROCESS_ID")
  if not 0 <= pid < num:
    raise ValueError(f"JAX_PROCESS_ID={pid} outside 0..JAX_NUM_PROCESSES-1={num - 1}")
  kwargs: dict[str, object] = {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"],
                               "num_processes": num, "process_id": pid}
  if env.get("JAX_LOCAL_DEVICE_IDS"):
    kwargs["local_device_ids"] = [int(i) for i in env["JAX_LOCAL_DEVICE_IDS"].split(",")]
  return kwargs


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None,
               local_device_ids: list[int] | None = None) -> bool:
  """Joins the multi-process job; returns False (and joins nothing) for a single process.
  Either way it first applies DEFAULT_XLA_FLAGS."""
  apply_default_xla_flags()
  if coordinator_address is not None:
    if num_processes is None or process_id is None:
      raise ValueError(f"coordinator_address={coordinator_address!r} needs num_processes and "
                       f"process_id (got {num_processes!r}, {process_id!r})")
    kwargs: dict[str, object] | None = {"coordinator_address": coordinator_address,
                                        "num_processes": num_processes,
                                        "process_id": process_id}
    if local_device_ids is not None:
      kwargs["local_device_ids"] = local_device_ids  # type: ignore[index]
  else:
    kwargs = explicit_args()
  if kwargs is None and not cluster_detected():
    return False
  if jax.config.jax_platforms == "cpu" or os.environ.get("JAX_PLATFORMS") == "cpu":
    # CPU collectives across processes (tests, CPU clusters) need an implementation.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**(kwargs or {}))
  return True


def initialize_from_env() -> bool:
  """`initialize()` from the environment only (what `launch/train.py` calls)."""
  return initialize()


def describe() -> str:
  """One line for logs: this process, the job's size and the devices it sees."""
  return (f"process {jax.process_index()}/{jax.process_count()}: "
          f"{jax.local_device_count()} local / {jax.device_count()} global "
          f"{jax.devices()[0].platform} devices")
