"""Every test process sees 8 simulated CPU devices, so data-parallel code is tested as it runs on a pod.

XLA reads the flag once, when jax is first imported: it must be set here, before any test imports jax.
Single-device references simply run on the default (first) device.
"""
import os
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One XLA compilation cache for the session and the subprocesses it starts: the many tiny runs compile
# the same programs, and a cache hit is the same executable (numbers are unchanged).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="convirt_jax_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest  # noqa: E402  (after the environment above: pytest plugins may import jax)


@pytest.fixture(scope="session")
def tiny_tfds_dir(tmp_path_factory):
  """One directory for the tiny synthetic data set (built on first use, keyed by its config)."""
  return str(tmp_path_factory.mktemp("tiny_tfds"))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_tfds_dir):
  """(workdir, results) of one finished tiny pretraining run (6 steps, warm-up + cosine, every
  evaluation), shared by the tests that only read a finished run (test_main, test_api_export): they
  must not write into it."""
  from convirt_jax.jobs import pretrain  # pylint: disable=g-import-not-at-top
  import tiny_config  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("tiny_run"))
  results = pretrain.run(tiny_config.cosine(tiny_tfds_dir), workdir)
  return workdir, results


# How `-n 2` (pytest-xdist) shares the tests out. Two groups each run in one test process, and are handed
# out first (xdist orders groups by size); every other test goes wherever a process is free:
# - "long": the tests that run whole jobs on several processes, or kill and rerun them. One after another,
#   their jobs' processes do not compete with each other for the cores (and their heartbeats), and they
#   run while the other test process works through the rest.
# - "tiny_run": the modules whose tests read the session's `tiny_run` (a session fixture is made once per
#   test process: so once).
# (xdist's own `xdist_group` marks do not take with this pytest: xdist renames the test ids to carry the
# group, and pytest 9 ignores that.)
GROUPS = {
    **dict.fromkeys(("test_main_multiprocess", "test_transfer_multiprocess", "test_faults",
                     "test_multiprocess", "test_multihost"), "long"),
    **dict.fromkeys(("test_main", "test_api_export", "test_remote_workdir", "test_text_length"), "tiny_run"),
}


def pytest_xdist_make_scheduler(config, log):
  from xdist.scheduler import LoadScopeScheduling  # pylint: disable=g-import-not-at-top

  class Grouped(LoadScopeScheduling):

    def _split_scope(self, nodeid: str) -> str:
      module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")
      return GROUPS.get(module, nodeid)

  return Grouped(config, log)
