"""A job on several processes (hosts): start-up within a deadline, the same settings everywhere, and a
lost process reported in one line instead of a hang in a collective or a runtime abort.

What the JAX runtime does on its own, and what this module adds:
- Start-up: `jax.distributed.initialize` waits until every process has registered and then aborts the
  process (a C++ fatal error and a stack dump). `join` gives up first, after
  `distributed.initialization_timeout_seconds`, with one line saying what to check.
- Agreement: jax does not check that the processes were started alike (a process told
  num_processes=3 joins a job of 2 and the job hangs later). `check_agreement` compares every process's
  num_processes and config through the coordinator's key-value store.
- Loss: a process that dies leaves the others waiting in a collective (for ever on TPU/GPU). Each
  process publishes a heartbeat in the key-value store, and a watchdog thread that sees a peer's
  heartbeat stop for `distributed.heartbeat_timeout_seconds` names it and exits. The coordinator runs
  in process 0: when it dies, the runtime aborts every other process at once, before any Python can
  run; so a multi-process job runs as the child of a small supervisor (`supervise`, which imports no
  jax) that reports that abort in one line. The runtime's own heartbeat deadline is set later than the
  watchdog's, so that the watchdog speaks first.

Exits: 1 for an error (after its one line), the child's own code otherwise.
"""
from __future__ import annotations

import atexit
import contextlib
import glob
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Mapping

from convirt_jax.errors import ConfigError

_WORKER_ENV = "CONVIRT_JAX_WORKER_STATUS_FD"  # set in the supervised child: where it reports its place
_KEY = "convirt_jax"
_BEAT_SECONDS = 1.0
_HERE: int | None = None  # this process's index, once known


def is_multi_process(distributed_config: Mapping[str, Any]) -> bool:
  """Whether `distributed_config` (with the environment: SLURM, Cloud TPU) asks for several processes."""
  if distributed_config["coordinator_address"]:
    return int(distributed_config["num_processes"]) > 1
  return cluster_detected()


def cluster_detected() -> bool:
  """A SLURM step of several tasks or a multi-host Cloud TPU: jax.distributed finds the processes."""
  return _slurm_task_count() > 1 or _on_multi_host_tpu()


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


def flag(key: str) -> str:
  return f"--config.distributed.{key}"


# --- the supervisor (the parent process; no jax here) ----------------------------------------------------

def is_supervised() -> bool:
  return _WORKER_ENV in os.environ


def supervise() -> int:
  """Runs this command again as a child process, forwards SIGTERM to it, and returns its exit code;
  when the JAX runtime aborted the child, says in one line why (the coordinator lost, above all)."""
  read_end, write_end = os.pipe()
  main = sys.modules["__main__"].__spec__.name
  child = subprocess.Popen([sys.executable, "-m", main, *sys.argv[1:]], pass_fds=(write_end,),
                           env=dict(os.environ, **{_WORKER_ENV: str(write_end)}),
                           preexec_fn=_die_with_parent)
  os.close(write_end)
  # SIGTERM (a preemption notice) goes to the child, which saves and exits; Ctrl-C reaches the child
  # from the terminal itself (same process group), so the parent only waits.
  signal.signal(signal.SIGTERM, lambda signum, _: child.send_signal(signum))
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  returncode = child.wait()
  with os.fdopen(read_end, "rb") as f:
    reports = [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]
  if returncode >= 0:
    return returncode
  place = reports[-1] if reports else None
  print(f"error: {_describe_abort(-returncode, place)}", file=sys.stderr, flush=True)
  return 1


def _die_with_parent() -> None:
  """The child is killed with its supervisor (a host that goes down takes both): Linux's PDEATHSIG."""
  if sys.platform.startswith("linux"):
    import ctypes  # pylint: disable=g-import-not-at-top
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _describe_abort(signum: int, place: dict | None) -> str:
  name = signal.Signals(signum).name if signum in signal.Signals.__members__.values() else str(signum)
  if place is None:
    return f"the job's process stopped on {name} before it joined the others"
  who = f"process {place['process']} of {place['processes']}"
  if signum == signal.SIGABRT and place["process"] != 0 and not _reachable(place["coordinator"]):
    return f"{who}: {_lost_coordinator(place['coordinator'])}"
  return f"{who} stopped on {name} (the JAX runtime's own message is above)."


def _lost_coordinator(address: str) -> str:
  """What a process says when process 0 is gone: the watchdog (its heartbeat store stopped answering)
  and the supervisor (the JAX runtime aborted the process) may either see it first."""
  return (f"lost process 0 (the coordinator, {address}): it was killed, crashed or preempted. Run the "
          "same command on every host to resume from the last complete checkpoint.")


def _reachable(address: str, timeout: float = 2.0) -> bool:
  host, _, port = address.rpartition(":")
  try:
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
      return True
  except (OSError, ValueError):
    return False


# --- in the job's process --------------------------------------------------------------------------------

def join(kwargs: dict[str, Any], initialization_timeout: int, heartbeat_timeout: int) -> None:
  """`jax.distributed.initialize(**kwargs)`, or one line and exit 1 after `initialization_timeout` s."""
  global _HERE
  import jax  # pylint: disable=g-import-not-at-top
  address = kwargs.get("coordinator_address", "")
  expected = kwargs.get("num_processes")
  _HERE = kwargs.get("process_id")

  def give_up():
    where = f"the coordinator at {address}" if address else "the coordinator (detected from the cluster)"
    nobody = (f"; nothing accepts connections at {address}" if address and kwargs.get("process_id")
              and not _reachable(address) else "")
    _exit(f"the job's {expected or 'detected number of'} processes did not all join {where} within "
          f"{initialization_timeout} s ({flag('initialization_timeout_seconds')}){nobody}. Start the same "
          f"command on every host, with the same {flag('coordinator_address')} and "
          f"{flag('num_processes')} and a distinct {flag('process_id')} each; process 0's host must "
          "accept connections on the coordinator's port.")

  timer = threading.Timer(initialization_timeout, give_up)
  timer.daemon = True
  timer.start()
  # The runtime's own deadlines come after ours: its expiry is an abort with a stack dump.
  jax.distributed.initialize(**kwargs, initialization_timeout=initialization_timeout + 30,
                             heartbeat_timeout_seconds=heartbeat_timeout + 30)
  timer.cancel()
  _HERE = jax.process_index()


def _client():
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return distributed.global_state.client


def announce_place() -> None:
  """Tells the supervisor which process this is, once the job has joined (read if the runtime aborts)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  fd = os.environ.get(_WORKER_ENV)
  if fd:
    line = json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                       "coordinator": distributed.global_state.coordinator_address})
    os.write(int(fd), (line + "\n").encode())


def check_agreement(num_processes: int, job_config: Mapping[str, Any] | None, timeout: int) -> None:
  """Every process was started with the same num_processes and the same config (but its process_id).

  Raises ConfigError naming the flag or the config keys that differ, in every process."""
  import jax  # pylint: disable=g-import-not-at-top
  here = jax.process_index()
  count = jax.process_count()
  settings = {"num_processes": num_processes, "config": _flat(job_config or {})}
  settings["config"].pop("distributed.process_id", None)
  client = _client()
  # Published first, so that every process can tell what differs, also when this one stops here.
  client.key_value_set(f"{_KEY}/settings/{here}", json.dumps(settings, sort_keys=True, default=str))
  if num_processes and num_processes != count:
    raise ConfigError(f"{flag('num_processes')}={num_processes}, but the coordinator runs a job of "
                      f"{count} processes: give every process the same {flag('num_processes')}")
  for other in range(count):
    if other == here:
      continue
    try:
      theirs = json.loads(client.blocking_key_value_get(f"{_KEY}/settings/{other}", timeout * 1000))
    except Exception:  # pylint: disable=broad-except  (a deadline: the runtime's own error type)
      raise ConfigError(f"process {other} did not report its settings within {timeout} s "
                        f"({flag('initialization_timeout_seconds')})") from None
    if theirs["num_processes"] != num_processes:
      raise ConfigError(f"process {other} was started with {flag('num_processes')}="
                        f"{theirs['num_processes']}, this process ({here}) with {num_processes}: give "
                        "every process the same value")
    mine = json.loads(json.dumps(settings["config"], sort_keys=True, default=str))
    differ = sorted(k for k in mine.keys() | theirs["config"].keys()
                    if mine.get(k) != theirs["config"].get(k))
    if differ:
      shown = "; ".join(f"{k}={theirs['config'].get(k)!r} there, {mine.get(k)!r} here" for k in differ[:5])
      raise ConfigError(f"process {other} runs another config than this process ({here}): {shown}. "
                        "Every process must run the same command (but its process_id).")


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


class _Watchdog(threading.Thread):
  """Publishes this process's heartbeat and stops the process when a peer's stops, or one failed."""

  def __init__(self, here: int, count: int, timeout: float):
    super().__init__(daemon=True, name="convirt_jax-watchdog")
    self.here, self.count, self.timeout = here, count, timeout
    self.client = _client()
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    self.coordinator = distributed.global_state.coordinator_address
    self.stopped = threading.Event()

  def run(self):
    beat, seen = 0, {}
    while not self.stopped.is_set():
      beat += 1
      now = time.monotonic()
      try:
        self.client.key_value_set(f"{_KEY}/alive/{self.here}", str(beat), allow_overwrite=True)
        values = dict(self.client.key_value_dir_get(f"{_KEY}/"))
      except Exception:  # pylint: disable=broad-except  (the coordinator's store is gone: process 0)
        if self.stopped.is_set() or _client() is None:  # or the program shut jax.distributed down
          return
        _exit(_lost_coordinator(self.coordinator), report=False)
      if self.stopped.is_set():
        return
      for other in range(self.count):
        failed = values.get(f"{_KEY}/failed/{other}")
        if other != self.here and failed:
          _exit(f"process {other} stopped with: {failed}", report=False)
        if other == self.here or f"{_KEY}/done/{other}" in values:  # done: waits at the shutdown
          continue
        value = values.get(f"{_KEY}/alive/{other}")
        if other not in seen or seen[other][0] != value:
          seen[other] = (value, now)
        elif now - seen[other][1] > self.timeout:
          _exit(f"lost process {other} of {self.count}: no heartbeat for {self.timeout:g} s "
                f"({flag('heartbeat_timeout_seconds')}); it was killed, crashed or preempted. Run the same "
                "command on every host to resume from the last complete checkpoint.", report=False)
      self.stopped.wait(_BEAT_SECONDS)


_WATCHDOG: _Watchdog | None = None


def start_watchdog(timeout: float) -> None:
  global _WATCHDOG
  import jax  # pylint: disable=g-import-not-at-top
  if _WATCHDOG is None:
    _WATCHDOG = _Watchdog(jax.process_index(), jax.process_count(), timeout)
    _WATCHDOG.start()
    # Before jax's own atexit shutdown (atexit runs last-registered first): a daemon thread still in a
    # key-value call when the interpreter finalizes aborts the process ("exception not rethrown").
    atexit.register(stop_watchdog)


def stop_watchdog() -> None:
  """The job is done here: the processes leave together through the runtime's shutdown barrier, and
  process 0 (the coordinator) may be gone first."""
  if _WATCHDOG is not None and not _WATCHDOG.stopped.is_set():
    with contextlib.suppress(Exception):
      _client().key_value_set(f"{_KEY}/done/{_WATCHDOG.here}", "1")
    _WATCHDOG.stopped.set()
    if _WATCHDOG is not threading.current_thread():
      _WATCHDOG.join(5 * _BEAT_SECONDS)  # out of any key-value call before the runtime shuts down


def wait_for_watchdog() -> None:
  """After an error in a collective: lets the watchdog name the lost process (it exits the process)
  before the error's traceback is shown; returns if it finds none within its timeout."""
  if _WATCHDOG is not None:
    _WATCHDOG.join(_WATCHDOG.timeout + 5 * _BEAT_SECONDS)


def fail(message: str) -> None:
  """Ends this process of a multi-process job with `message` (one line), telling the other processes
  first, without waiting at the runtime's shutdown barrier for processes that may never get there."""
  _exit(message, report=True)


def _exit(message: str, report: bool = True) -> None:
  here = _HERE
  prefix = f"process {here}: " if here is not None else ""
  print(f"error: {prefix}{message}", file=sys.stderr, flush=True)
  if report and here is not None:
    with contextlib.suppress(Exception):
      if _WATCHDOG is not None:
        _client().key_value_set(f"{_KEY}/failed/{here}", message.splitlines()[0][:2000])
      if here == 0:
        # The coordinator: its exit makes the runtime abort the others. Give them time to read the
        # message, or (before the watchdog, e.g. settings that disagree) to reach their own error line.
        time.sleep(3 * _BEAT_SECONDS)
  sys.stdout.flush()
  os._exit(1)  # pylint: disable=protected-access
