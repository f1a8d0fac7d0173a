"""Bad distributed settings stop every process of the job with one line naming the flag, within the
stated time (distributed.initialization_timeout_seconds, plus start-up), not a hang or a stack dump.

Each case is `python -m convirt_jax.main` on the tiny config; nothing gets as far as compiling.
"""
import os
import time

import pytest

import multiprocess_jobs

TINY = os.path.join(multiprocess_jobs.TESTS, "tiny_config.py")
JOIN_S = 4  # --config.distributed.initialization_timeout_seconds of these cases
MARGIN_S = 40  # interpreter and jax start-up on a loaded 2-core machine


def _start(tmp_path, name, process_ids, num_processes, port):
  """One process per entry; the distributed flags given explicitly (processes=1: none added)."""
  jobs = []
  for i, (pid, count) in enumerate(zip(process_ids, num_processes)):
    jobs.append(multiprocess_jobs.Job("convirt_jax.main", [
        f"--config={TINY}", f"--workdir={tmp_path / name}",
        f"--config.distributed.coordinator_address=127.0.0.1:{port}",
        f"--config.distributed.num_processes={count}", f"--config.distributed.process_id={pid}",
        f"--config.distributed.initialization_timeout_seconds={JOIN_S}"], tmp_path / f"{name}_{i}",
        processes=1))
  return jobs


CASES = {
    # name: (process ids, their num_processes, what every process's last line says)
    "unreachable": ((1,), (2,), f"did not all join the coordinator at 127.0.0.1:{{port}} within {JOIN_S} s "
                                "(--config.distributed.initialization_timeout_seconds); nothing accepts"),
    "id_out_of_range": ((2,), (2,), "0 <= distributed.process_id < num_processes; got 2 and 2"),
    "told_3_of_2": ((0, 1), (2, 3), "--config.distributed.num_processes"),
    "told_2_of_3": ((0, 1), (3, 2), f"did not all join the coordinator at 127.0.0.1:{{port}} within {JOIN_S} s"),
}


def test_bad_distributed_settings_stop_each_process_in_one_line(tmp_path):
  started = time.monotonic()
  runs = {}
  for name, (ids, counts, _) in CASES.items():  # all cases at once: each mostly waits
    port = multiprocess_jobs.free_port()
    runs[name] = port, _start(tmp_path, name, ids, counts, port)
  for name, (port, jobs) in runs.items():
    expected = CASES[name][2].format(port=port)
    for job in jobs:
      code = job.wait(timeout=JOIN_S + MARGIN_S + 60)[0]
      out = job.output(0)
      line = multiprocess_jobs.last_line(out)
      assert code == 1 and line.startswith("error: ") and expected in line, (name, out[-3000:])
      assert "Traceback" not in out and "Check failure" not in out, (name, out[-3000:])
  assert time.monotonic() - started < JOIN_S + MARGIN_S
  assert not any((tmp_path / name).exists() for name in CASES), "nothing is written before the job starts"


@pytest.mark.parametrize("count", ["0", "-1"])
def test_a_timeout_that_is_not_positive_is_a_config_error(count):
  from convirt_jax import parallel  # pylint: disable=g-import-not-at-top
  from convirt_jax.config import base_config  # pylint: disable=g-import-not-at-top
  from convirt_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  config = base_config().distributed
  config.coordinator_address, config.num_processes, config.process_id = "127.0.0.1:1", 2, 0
  config.heartbeat_timeout_seconds = int(count)
  with pytest.raises(ConfigError, match="heartbeat_timeout_seconds"):
    parallel.initialize(config)


class _SlowStore:
  """The coordinator's key-value store as the watchdog sees it, each read taking a while (as an RPC)."""

  def __init__(self):
    self.values, self.reads = {}, 0

  def key_value_set(self, key, value, allow_overwrite=False):
    self.values[key] = value

  def key_value_dir_get(self, prefix):
    self.reads += 1
    time.sleep(0.3)
    return [(k, v) for k, v in self.values.items() if k.startswith(prefix)]


def test_the_watchdog_is_out_of_the_store_before_the_runtime_shuts_down(monkeypatch):
  # A daemon thread still inside a store call when the interpreter finalizes aborts the process
  # ("terminate called ... exception not rethrown"), which a two-process run once did at its exit.
  from convirt_jax import multihost
  store, exits = _SlowStore(), []
  monkeypatch.setattr(multihost, "_client", lambda: store)
  monkeypatch.setattr(multihost, "_WATCHDOG", None)
  monkeypatch.setattr(multihost.atexit, "register", exits.append)
  multihost.start_watchdog(timeout=60)
  watchdog = multihost._WATCHDOG
  while store.reads == 0:
    time.sleep(0.01)
  assert multihost.stop_watchdog in exits, "stopped at exit too (after jax registered its shutdown: runs first)"
  multihost.stop_watchdog()
  assert not watchdog.is_alive()
  assert store.values["convirt_jax/done/0"] == "1"
  multihost.stop_watchdog()  # again (the job's end, then atexit): nothing more to do
