"""A job's command line on several real processes of one machine (2 simulated CPU devices each), as on
the hosts of a pod: each process writes its own log, and a test can wait for a file, then kill or stop
one process.

The processes build with XLA's cheapest optimisation level (as test_faults.py's jobs): compiling is
most of these tests' time, and every run compared with another is built with the same flags.
"""
import os
import re
import signal
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")
HEARTBEAT_S = 5  # --config.distributed.heartbeat_timeout_seconds of these jobs
# Lines a job's log must not have (logs.py): absl's Python prefix ("W1201 12:00:00.123456 42 file.py:12]"),
# TFDS's builder-config dump and build banners, orbax's INFO lines.
NOT_OURS = re.compile(r"^(process \d+: )?[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ |Using custom data configuration|"
                      r"OpenCV is not installed|Downloading and preparing|Subsequent calls will reuse|orbax")
# Not checked: the CUDA plugin's C++ notice ("I0000 00:00:... cudart_stub.cc:31] Could not find cuda
# drivers"), printed by its own statically linked absl at every jax start because the test environment
# installs the plan's compilers (requirements-plan.txt) beside the jobs; no logger level reaches it. The
# README says to give the plan its own environment.
CHEAP_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def env(devices: int = 2) -> dict[str, str]:
  return dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {CHEAP_XLA}")


class Job:
  """`python -m MODULE ARGS` on `processes` processes (one, without distributed flags, when 1)."""

  def __init__(self, module: str, args: list[str], logs: str, processes: int = 2, devices: int = 2,
               extra: list[str] | None = None):
    os.makedirs(logs, exist_ok=True)
    port = free_port()
    self.logs = [os.path.join(logs, f"process_{i}.log") for i in range(processes)]
    self.procs = []
    for i in range(processes):
      distributed = [] if processes == 1 else [
          f"--config.distributed.coordinator_address=127.0.0.1:{port}",
          f"--config.distributed.num_processes={processes}", f"--config.distributed.process_id={i}",
          f"--config.distributed.heartbeat_timeout_seconds={HEARTBEAT_S}"]
      command = [sys.executable, "-m", module, *args, *distributed, *(extra or [])]
      with open(self.logs[i], "w") as out:
        self.procs.append(subprocess.Popen(command, cwd=REPO, env=env(devices), stdout=out,
                                           stderr=subprocess.STDOUT))

  def output(self, i: int) -> str:
    with open(self.logs[i]) as f:
      return f.read()

  def wait(self, timeout: float = 600) -> list[int]:
    """The exit codes of every process (all are killed if one outlives `timeout`)."""
    deadline = time.monotonic() + timeout
    try:
      return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in self.procs]
    finally:
      self.kill()

  def assert_ok(self, timeout: float = 600) -> None:
    codes = self.wait(timeout)
    for i, code in enumerate(codes):
      assert code == 0, f"process {i} exited with {code}:\n{self.output(i)[-4000:]}"

  def when(self, path_exists, timeout: float = 300) -> None:
    """Waits until `path_exists()` is true while every process still runs."""
    deadline = time.monotonic() + timeout
    while not path_exists():
      for i, p in enumerate(self.procs):
        assert p.poll() is None, f"process {i} ended ({p.returncode}) first:\n{self.output(i)[-4000:]}"
      assert time.monotonic() < deadline, "timed out"
      time.sleep(0.02)

  def signal(self, i: int, signum: int = signal.SIGKILL) -> float:
    self.procs[i].send_signal(signum)
    return time.monotonic()

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def last_line(text: str) -> str:
  return text.strip().splitlines()[-1] if text.strip() else ""
