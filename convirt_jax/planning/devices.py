"""Compile-only devices of a target: libtpu's TPU topologies and the CUDA plugin's GPU topologies.

Nothing here touches a network or an accelerator. `prepare_environment` must run before jax is imported:
  - JAX_PLATFORMS=cpu: the process's own backend is the CPU, so the CUDA plugin creates no GPU client
    (and looks for no driver) and libtpu opens no TPU;
  - TPU_SKIP_MDS_QUERY=1: libtpu asks no cloud metadata server what it runs on;
  - ALLOW_MULTIPLE_LIBTPU_LOAD=1: libtpu's lock on the machine's TPU chips (one process at a time)
    guards chips this process never opens; several plans (or test processes) may compile at once;
  - JAX_ENABLE_COMPILATION_CACHE=false: jax 0.10 writes compile-only executables to the persistent
    cache but cannot load them back ("PjRtCompiler must be constructed with a Client"), so the cache
    would only cost disk and print a warning on every hit;
  - TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES: what libtpu would otherwise look up (and warn about
    not finding); the topology it compiles for is given explicitly to get_topology_desc, so these
    values change nothing in the programs.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import re
import sys
import tempfile
from typing import Iterator

from convirt_jax.errors import UserError
from convirt_jax.planning.targets import Target, gpu_target_config

REQUIREMENTS = "requirements-plan.txt"
# Printed by the CUDA plugin's extension when it loads on a machine without a driver (expected here),
# and XLA's alarm when a compile takes minutes (the paper's step does, on a small CPU).
_HARMLESS = re.compile(r"cudart_stub\.cc.*Could not find cuda drivers|"
                       r"^WARNING: All log messages before absl::InitializeLog\(\) is called|"
                       r"slow_operation_alarm\.cc|^\*+$|Very slow compile\? If you want to file a bug")


class CompilerUnavailable(UserError, RuntimeError):
  """The TPU or GPU compiler of a target is not installed (requirements-plan.txt)."""


def prepare_environment() -> None:
  """The process environment of a compile-only run (see the module doc); call before importing jax."""
  if "jax" in sys.modules and os.environ.get("JAX_PLATFORMS", "") != "cpu":
    import jax  # pylint: disable=g-import-not-at-top
    if jax.default_backend() != "cpu":
      raise RuntimeError("the plan needs the CPU as the process's own JAX backend")
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["TPU_SKIP_MDS_QUERY"] = "1"
  os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
  os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
  """Drops the CUDA plugin's "no driver" lines, which native code writes to fd 2 when it loads; any
  other line written meanwhile is passed on."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode="w+b") as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      lines = captured.read().decode(errors="replace").splitlines()
      kept = [line for line in lines if line.strip() and not _HARMLESS.search(line)]
      if kept:
        print("\n".join(kept), file=sys.stderr)


def start_jax() -> None:
  """Imports jax and starts its CPU backend, without the CUDA plugin's "no driver" lines."""
  with quiet_native_stderr():
    import jax  # pylint: disable=g-import-not-at-top
    jax.devices("cpu")


def require_compiler(platform: str) -> None:
  """CompilerUnavailable naming requirements-plan.txt when the platform's compiler is not installed."""
  module, package = {"tpu": ("libtpu", "libtpu"),
                     "cuda": ("jax_plugins.xla_cuda12", "jax-cuda12-plugin / jax-cuda12-pjrt")}[platform]
  try:
    found = importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:
    found = False
  if not found:
    raise CompilerUnavailable(
        f"compiling for a {platform.upper()} target needs {package}, which is not installed: "
        f"pip install -r {REQUIREMENTS}")


@functools.lru_cache(maxsize=None)
def mesh_for(target: Target):
  """A 1-D "data" mesh over the target's compile-only devices (the jobs' mesh shape and axis)."""
  require_compiler(target.platform)
  with quiet_native_stderr():
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    from convirt_jax import parallel  # pylint: disable=g-import-not-at-top
    try:
      if target.platform == "tpu":
        topology = topologies.get_topology_desc(
            platform="tpu", topology_name=target.topology, chip_config_name=target.chip_config,
            chips_per_host_bounds=target.chips_per_host_bounds, num_slices=1)
      else:
        topology = topologies.get_topology_desc(
            platform="cuda", topology_name=target.topology, target_config=gpu_target_config(target),
            topology=target.topology)
    except Exception as e:  # pylint: disable=broad-except  (a plugin that does not load: one line)
      raise CompilerUnavailable(f"{target.name}: the {target.platform.upper()} compiler did not start "
                                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                                f"see {REQUIREMENTS}") from None
    devices = topology.devices
    if len(devices) != target.chips:
      raise RuntimeError(f"{target.name}: the topology has {len(devices)} devices, expected "
                         f"{target.chips}")
    # The device order jax.make_mesh gives the jobs (create_device_mesh), in the jobs' own mesh.
    return parallel.make_mesh(list(mesh_utils.create_device_mesh((len(devices),), list(devices))))
