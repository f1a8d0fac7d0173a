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
  from convirt_jax import pretrain  # pylint: disable=g-import-not-at-top
  import tiny_config  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("tiny_run"))
  results = pretrain.run(tiny_config.cosine(tiny_tfds_dir), workdir)
  return workdir, results
