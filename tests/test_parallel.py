"""The mesh, global batches, replication and jax.distributed start-up (single process, 8 devices)."""
import jax
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from convirt_jax import multihost, parallel
from convirt_jax.config import base_config

# The runtime's own deadlines, 30 s after the job's (300 s to join, 60 s of silence): its expiry aborts.
RUNTIME_TIMEOUTS = {"initialization_timeout": 330, "heartbeat_timeout_seconds": 90}


def test_mesh_spans_every_device_on_one_data_axis():
  mesh = parallel.make_mesh()
  assert mesh.axis_names == ("data",)
  assert mesh.size == jax.device_count() == 8
  assert mesh.axis_types == (AxisType.Auto,)
  assert parallel.make_mesh(jax.devices()[:1]).size == 1


def test_shard_batch_puts_consecutive_rows_on_each_device():
  mesh = parallel.make_mesh()
  batch = {"image": np.arange(16 * 2 * 2 * 3, dtype=np.uint8).reshape(16, 2, 2, 3),
           "input_ids": np.arange(16 * 5, dtype=np.int32).reshape(16, 5)}
  sharded = parallel.shard_batch(batch, mesh)
  for key, value in batch.items():
    array = sharded[key]
    assert array.shape == value.shape and array.dtype == value.dtype
    assert array.sharding.spec == P("data")
    np.testing.assert_array_equal(np.asarray(array), value)
    for shard in array.addressable_shards:
      device_pos = list(mesh.devices.flat).index(shard.device)
      np.testing.assert_array_equal(np.asarray(shard.data), value[2 * device_pos:2 * device_pos + 2])


def test_shard_batch_rejects_rows_not_divisible_by_devices():
  with pytest.raises(ValueError, match=r"batch\['input_ids'\]"):
    parallel.shard_batch({"input_ids": np.zeros((12, 4), np.int32)}, parallel.make_mesh())


def test_local_batch_size_names_the_config_key():
  assert parallel.local_batch_size(32) == 32  # One process holds all 8 devices.
  assert parallel.local_batch_size(3, parallel.make_mesh(jax.devices()[:1])) == 3
  for bad in (12, 0):
    with pytest.raises(ValueError, match="train.batch_size"):
      parallel.local_batch_size(bad)


def test_replicate_and_fetch():
  mesh = parallel.make_mesh()
  tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "step": np.int32(3)}
  replicated = parallel.replicate(tree, mesh)
  assert replicated["w"].sharding.is_fully_replicated
  assert len(replicated["w"].addressable_shards) == 8
  fetched = parallel.fetch(replicated)
  np.testing.assert_array_equal(fetched["w"], tree["w"])
  assert fetched["step"] == 3
  assert parallel.is_main_process()


class _Recorder:
  """Stands in for jax.distributed.initialize: the test process must stay single-process."""

  def __init__(self):
    self.calls = []

  def __call__(self, **kwargs):
    self.calls.append(kwargs)


@pytest.fixture
def recorder(monkeypatch):
  record = _Recorder()
  monkeypatch.setattr(jax.distributed, "initialize", record)
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  for var in ("SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES",
              "MEGASCALE_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(var, raising=False)
  # The TPU VM probe looks at /dev and libtpu; here only the environment may decide.
  monkeypatch.setattr(multihost, "_on_tpu_vm", lambda: False)
  return record


def test_initialize_single_process_is_a_no_op(recorder, monkeypatch):
  assert parallel.initialize(base_config().distributed) is False
  monkeypatch.setenv("SLURM_NTASKS", "1")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")  # A single-host TPU VM.
  assert parallel.initialize(base_config().distributed) is False
  assert recorder.calls == []


def test_initialize_explicit_coordinator(recorder):
  config = base_config().distributed
  config.coordinator_address, config.num_processes, config.process_id = "10.0.0.1:1234", 4, 2
  assert parallel.initialize(config) is True
  assert recorder.calls == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                             "process_id": 2, **RUNTIME_TIMEOUTS}]


@pytest.mark.parametrize("env", [{"SLURM_NTASKS": "4"}, {"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"},
                                 {"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1:8080"}])
def test_initialize_leaves_cluster_detection_to_jax(recorder, monkeypatch, env):
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  assert parallel.initialize(base_config().distributed) is True
  assert recorder.calls == [RUNTIME_TIMEOUTS]


def test_initialize_rejects_a_bad_process_id(recorder):
  config = base_config().distributed
  config.coordinator_address, config.num_processes, config.process_id = "10.0.0.1:1234", 2, 2
  with pytest.raises(ValueError, match="distributed.process_id"):
    parallel.initialize(config)


def test_initialize_is_idempotent(monkeypatch):
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
  monkeypatch.setattr(jax.distributed, "initialize", lambda **_: pytest.fail("initialized twice"))
  config = base_config().distributed
  config.coordinator_address, config.num_processes, config.process_id = "10.0.0.1:1234", 2, 0
  assert parallel.initialize(config) is True
