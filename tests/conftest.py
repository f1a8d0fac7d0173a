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
