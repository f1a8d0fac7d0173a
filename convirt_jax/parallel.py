"""Data parallelism over every device of every process: start-up, the mesh, and global batches.

One mesh axis, "data", spans all devices of all hosts. Each process loads only its slice of the global
batch (`local_batch_size`), `shard_batch` assembles the slices into global arrays sharded over "data",
and the train state is replicated. On one process all of this degenerates to the local devices.
"""
import glob
import importlib.util
import logging
import os
from typing import Any, Mapping

import jax
import ml_collections
from jax.experimental import multihost_utils
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from convirt_jax.errors import AcceleratorUnavailable, ConfigError

DATA_AXIS = "data"


def _slurm_task_count() -> int:
  return int(os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "1")) or 1)


def _on_multi_host_tpu() -> bool:
  """True on a Cloud TPU VM (pod slice or multislice), where jax reads the topology itself."""
  if os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return True
  hosts = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES") or ""
  if len([h for h in hosts.split(",") if h.strip()]) > 1:
    return True
  # A TPU VM without those variables: jax asks the VM metadata server (one host there gives 1 process).
  return _on_tpu_vm()


def _on_tpu_vm() -> bool:
  has_tpu_chips = bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))
  return has_tpu_chips and importlib.util.find_spec("libtpu") is not None


def initialize(distributed_config: ml_collections.ConfigDict | Mapping[str, Any]) -> bool:
  """Joins the processes of a multi-process job; returns whether jax.distributed is running.

  Must run before anything touches a jax device. Explicit `coordinator_address`, `num_processes` and
  `process_id` win; otherwise SLURM (more than one task) and Cloud TPU VMs are detected and left to
  jax's own cluster detection; otherwise this is a single process and nothing happens. Calling it
  again is harmless.
  """
  if jax.distributed.is_initialized():
    return True
  address = distributed_config["coordinator_address"]
  num_processes = int(distributed_config["num_processes"])
  process_id = int(distributed_config["process_id"])
  # Cross-process collectives for CPU devices (multi-process CPU runs, tests); TPUs and GPUs ignore it.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if address:
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ConfigError(
          f"distributed.coordinator_address={address!r} needs distributed.num_processes >= 1 and "
          f"0 <= distributed.process_id < num_processes; got {num_processes} and {process_id}")
    if num_processes == 1:
      _start_backend()
      return False
    jax.distributed.initialize(coordinator_address=address, num_processes=num_processes,
                               process_id=process_id)
  elif _slurm_task_count() > 1 or _on_multi_host_tpu():
    jax.distributed.initialize()
  else:
    _start_backend()
    return False
  _start_backend()
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def _start_backend() -> None:
  """Starts the devices now (after jax.distributed): a missing GPU/TPU is one line, not a traceback."""
  try:
    jax.devices()
  except (RuntimeError, AssertionError) as e:
    platforms = os.environ.get("JAX_PLATFORMS", "")
    raise AcceleratorUnavailable(
        f"JAX could not start its {platforms or 'default'} backend ({type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}). Is a GPU/TPU visible to this process? To run on "
        "the CPU, unset JAX_PLATFORMS (or set JAX_PLATFORMS=cpu).") from None


def is_main_process() -> bool:
  """Process 0 writes what must be written once (logs, metrics files, reports)."""
  return jax.process_index() == 0


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with axis "data" over `devices` (default: every device of every process).

  Auto axis type: jit places and reshards arrays itself, as in a pmap-style program; the explicit
  sharding-in-types mode is not needed for pure data parallelism.
  """
  if devices is None:
    return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(AxisType.Auto,))
  return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def local_batch_size(global_batch_size: int, mesh: Mesh | None = None) -> int:
  """The rows this process loads per step: the global batch split evenly over processes and devices."""
  if mesh is None:
    num_devices, processes = jax.device_count(), jax.process_count()
  else:  # the mesh's own processes (the plan's compile-only meshes span hosts this process is not)
    num_devices, processes = mesh.size, len({d.process_index for d in mesh.devices.flat})
  if global_batch_size < 1 or global_batch_size % num_devices:
    raise ConfigError(
        f"train.batch_size={global_batch_size} must be a positive multiple of the number of devices "
        f"({num_devices} over {processes} processes), so every device gets the same rows")
  return global_batch_size // processes


def data_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_batch(local_batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Turns this process's rows into global arrays sharded over "data" (rows of process 0 first)."""
  sharding = data_sharding(mesh)
  local_devices = len(mesh.local_devices)
  out = {}
  for key, value in local_batch.items():
    value = np.asarray(value)
    if value.ndim == 0 or value.shape[0] % local_devices:
      raise ValueError(
          f"batch[{key!r}] has shape {value.shape}: its leading (batch) dimension must be a multiple "
          f"of this process's {local_devices} devices")
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Copies every leaf to every device of the mesh (each process passes the same values)."""
  sharding = replicated_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def fetch(tree: Any) -> Any:
  """Host numpy copies of replicated arrays; works on every process, also when the mesh spans hosts."""
  def to_numpy(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if not x.is_fully_replicated:
        raise ValueError(f"fetch() needs replicated arrays; got one sharded as {x.sharding}")
      return np.asarray(x.addressable_data(0))
    return np.asarray(x)
  return jax.tree.map(to_numpy, tree)


def gather_rows(x) -> np.ndarray:
  """A global (sharded) or host-local array -> the rows of every process, on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  if isinstance(x, jax.Array):
    return np.asarray(x)
  x = np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True)) if jax.process_count() > 1 else x
