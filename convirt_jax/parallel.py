"""Data parallelism over every device of every process: start-up, the mesh, and global batches.

One mesh axis, "data", spans all devices of all hosts. Each process loads only its slice of the global
batch (`local_batch_size`), `shard_batch` assembles the slices into global arrays sharded over "data",
and the train state is replicated. On one process all of this degenerates to the local devices.
"""
import logging
import os
from typing import Any, Mapping

import jax
import ml_collections
from jax.experimental import multihost_utils
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from convirt_jax import logs, multihost
from convirt_jax.errors import AcceleratorUnavailable, ConfigError

DATA_AXIS = "data"


def initialize(distributed_config: ml_collections.ConfigDict | Mapping[str, Any],
               job_config: Mapping[str, Any] | None = None) -> bool:
  """Joins the processes of a multi-process job; returns whether jax.distributed is running.

  Must run before anything touches a jax device: `cli.run_job` calls it first thing for both jobs.
  Explicit `coordinator_address`, `num_processes` and `process_id` win; otherwise SLURM (more than one
  task) and Cloud TPU VMs are detected and left to jax's own cluster detection; otherwise this is a
  single process and nothing happens. With several processes, `multihost` bounds the start-up, checks
  that every process runs the same `job_config` (a dict) and watches for a lost process. Calling it
  again is harmless.
  """
  if jax.distributed.is_initialized():
    return True
  address = distributed_config["coordinator_address"]
  num_processes = int(distributed_config["num_processes"])
  process_id = int(distributed_config["process_id"])
  init_timeout = int(distributed_config["initialization_timeout_seconds"])
  heartbeat_timeout = int(distributed_config["heartbeat_timeout_seconds"])
  if init_timeout < 1 or heartbeat_timeout < 1:
    raise ConfigError("config.distributed.initialization_timeout_seconds and heartbeat_timeout_seconds "
                      f"must be positive; got {init_timeout} and {heartbeat_timeout}")
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
    kwargs = dict(coordinator_address=address, num_processes=num_processes, process_id=process_id)
  elif multihost.cluster_detected():
    kwargs, num_processes = {}, 0
  else:
    _start_backend()
    return False
  multihost.join(kwargs, init_timeout, heartbeat_timeout)
  _start_backend()
  if jax.process_count() > 1:
    logs.set_process(jax.process_index(), jax.process_count())
    multihost.announce_place()
    multihost.check_agreement(num_processes, job_config, init_timeout)
    multihost.start_watchdog(heartbeat_timeout)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def _start_backend() -> None:
  """Starts the devices now (after jax.distributed): a missing GPU/TPU is one line, not a traceback."""
  # jax logs a plugin that fails to load (no CUDA libraries, say) with its traceback; the line below
  # says it instead, with the plugin's own last words.
  bridge, held = logging.getLogger("jax._src.xla_bridge"), _Held()
  bridge.addHandler(held)
  propagate, bridge.propagate = bridge.propagate, False
  try:
    jax.devices()
  except (RuntimeError, AssertionError) as e:
    platforms = os.environ.get("JAX_PLATFORMS", "")
    detail = str(e).strip().splitlines() or held.last_lines()
    raise AcceleratorUnavailable(
        f"JAX could not start its {platforms or 'default'} backend ({type(e).__name__}: "
        f"{detail[-1] if detail else ''}). Is a GPU/TPU visible to this process? To run on "
        "the CPU, unset JAX_PLATFORMS (or set JAX_PLATFORMS=cpu).") from None
  finally:
    bridge.removeHandler(held)
    bridge.propagate = propagate
  for record in held.records:  # the backend started: what jax had to say is shown as it would be
    if record.levelno >= logging.WARNING and record.exc_info is None:
      logging.getLogger(record.name).handle(record)


class _Held(logging.Handler):
  def __init__(self):
    super().__init__()
    self.records = []

  def emit(self, record):
    self.records.append(record)

  def last_lines(self) -> list[str]:
    lines = [line for r in self.records for line in
             (r.getMessage() + "\n" + (logging.Formatter().formatException(r.exc_info) if r.exc_info else "")).splitlines()
             if line.strip() and not line.startswith((" ", "Traceback", "The above"))]
    return lines


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


def from_process_0(flag: bool) -> bool:
  """Process 0's `flag` on every process: a decision read from shared storage that another process
  may change (by creating a directory) before the slower processes look."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag, np.int32)))


def gather_rows(x) -> np.ndarray:
  """A global (sharded) or host-local array -> the rows of every process, on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  if isinstance(x, jax.Array):
    return np.asarray(x)
  x = np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True)) if jax.process_count() > 1 else x
