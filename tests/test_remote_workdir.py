"""gs:// workdirs and data dirs: the tiny pretraining job, interrupted and resumed in a bucket, ends with
the parameters of an uninterrupted run and leaves every file of a workdir there; ConVIRT.load and the
transfer job read it back. The bucket is an in-memory GCS served from this process (tests/fake_gcs.py).
Other schemes are refused in one line before anything is made.
"""
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from etils import epath

import fake_gcs
import tiny_config
from convirt_jax import ConVIRT, storage
from convirt_jax.jobs import pretrain
from convirt_jax.jobs import transfer as transfer_job
from convirt_jax.errors import ConfigError
from convirt_jax.training import checkpoints
from convirt_jax.training import steps as steps_lib
from convirt_jax.transfer_config import transfer_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN, TFDS = "gs://bucket/run", "gs://bucket/tfds"


@pytest.fixture(scope="module")
def gcs():
  with fake_gcs.serve("bucket") as url:
    yield url


def tiny(workdir_tfds: str = TFDS):
  """The training config of the shared finished run (conftest.py's tiny_run), evaluated more cheaply."""
  return tiny_config.cosine(workdir_tfds, eval__random_init_baseline=False,
                            evals__linear_probe__fractions=(1.0,))


def _objects(directory: epath.Path):
  for child in directory.iterdir():
    yield from _objects(child) if child.is_dir() else [child]


def test_checkpoints_in_a_bucket_keep_delete_and_set_aside_a_damaged_step(gcs, tmp_path):
  """gcsfs (epath) and tensorstore (orbax) write, list, read and delete the same objects; a step whose
  arrays no longer read back is skipped and moved to unreadable_checkpoints/ (copied, then deleted)."""
  workdir = epath.Path("gs://bucket/smoke")
  storage.write_json(workdir / "a.json", {"x": 1})
  assert storage.read_json(workdir / "a.json") == {"x": 1}
  manager = checkpoints.make_manager(os.fspath(workdir), keep=2)
  for step in (1, 2, 3):
    checkpoints.save(manager, step, {"w": np.full(3, step, np.float32)}, meta={"step": step})
  manager.wait_until_finished()
  assert manager.all_steps() == [2, 3]  # step 1 deleted, object by object
  for data in _objects(workdir / "checkpoints" / "3" / "state"):
    if data.parent.name == "d":
      data.write_bytes(data.read_bytes()[:8])  # a cut array file
  said = []
  step, restored, meta = checkpoints.restore_newest(manager, {"w": np.zeros(3, np.float32)},
                                                    announce=said.append)
  manager.close()
  assert (step, meta) == (2, {"step": 2})
  np.testing.assert_array_equal(restored["w"], [2, 2, 2])
  assert said[0].startswith("checkpoint step 3 in gs://bucket/smoke/checkpoints is unreadable (")
  assert (workdir / "unreadable_checkpoints" / "3" / "state").is_dir()
  assert not (workdir / "checkpoints" / "3").exists()
  storage.copy_tree(workdir, tmp_path / "copy")
  assert sorted(os.listdir(tmp_path / "copy")) == ["a.json", "checkpoints", "unreadable_checkpoints"]
  storage.rmtree(workdir)
  assert not workdir.exists()


def test_the_command_refuses_another_scheme_in_one_line_and_makes_nothing(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "convirt_jax.main", f"--config={REPO}/tests/tiny_config.py", "--workdir=s3://x/y"],
      cwd=tmp_path, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      "error: --workdir=s3://x/y: s3:// is not supported; give a local path or gs://bucket/path")
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("field, value", [("workdir", "hdfs://nn/run"), ("data.tfds_dir", "http://host/tfds")])
def test_other_schemes_are_refused_in_one_line_before_anything_is_made(tmp_path, monkeypatch, field, value):
  monkeypatch.chdir(tmp_path)
  config, workdir = tiny(str(tmp_path / "tfds")), str(tmp_path / "run")
  if field == "workdir":
    workdir = value
  else:
    config.data.tfds_dir = value
  flag = "--workdir" if field == "workdir" else "--config.data.tfds_dir"
  with pytest.raises(ConfigError) as e:
    pretrain.run(config, workdir)
  scheme = value.split(":")[0]
  assert str(e.value) == f"{flag}={value}: {scheme}:// is not supported; give a local path or gs://bucket/path"
  assert os.listdir(tmp_path) == []
  with pytest.raises(ConfigError, match="s3:// is not supported"):
    ConVIRT.load("s3://x/y")


def _sigterm_at(monkeypatch, stop_step: int):
  real = steps_lib.make_train_step

  def make(*args, **kwargs):
    step_fn = real(*args, **kwargs)

    def train_step(state, batch):
      state, metrics = step_fn(state, batch)
      if int(jax.device_get(state["step"])) == stop_step:
        os.kill(os.getpid(), signal.SIGTERM)  # as a preemption notice would
      return state, metrics
    return train_step

  monkeypatch.setattr(steps_lib, "make_train_step", make)


@pytest.fixture(scope="module")
def resumed_run(gcs, tiny_run):
  """The shared uninterrupted run on local disk, and the same training in the bucket (data set included)
  stopped at step 3 and resumed."""
  local, _ = tiny_run
  with pytest.MonkeyPatch.context() as mp:
    _sigterm_at(mp, 3)
    assert pretrain.run(tiny(), RUN) == {}
  assert checkpoints.make_manager(RUN, read_only=True).latest_step() == 3
  results = pretrain.run(tiny(), RUN)
  return local, results


def test_a_run_in_a_bucket_resumes_exactly_and_writes_everything(resumed_run):
  local, results = resumed_run
  run = epath.Path(RUN)
  for name in ("config.json", "metrics.jsonl", "results.json", "results.md", "loss_curve.png",
               "probe_curves.png", "retrieval_examples.png", "text_config.json"):
    assert (run / name).is_file(), name
  assert {"tokenizer.json", "vocab.txt"} <= {p.name for p in (run / "tokenizer").iterdir()}
  events = [p.name for p in (run / "tensorboard").iterdir()]
  assert len(events) == 2 and all(name.startswith("events.out.tfevents") for name in events), events
  rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  # Each step once across the resume (3: the preempted run's last log, before its checkpoint).
  assert [r["step"] for r in rows if "train/loss" in r] == [2, 3, 4, 6]
  assert [r["step"] for r in rows if "val/loss" in r] == [3, 6]
  assert json.loads((run / "results.json").read_text())["methods"].keys() == results["methods"].keys()
  assert not any(name.startswith("gs:") for name in os.listdir("."))  # nothing written locally by mistake
  a, b = (checkpoints.restore_variables(d, 6) for d in (local, RUN))
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_the_api_and_the_transfer_job_read_a_run_in_a_bucket(resumed_run, tmp_path):
  model = ConVIRT.load(RUN)
  assert model.encode_texts(["Small left pleural effusion."]).shape == (1, 16)
  config = transfer_config()
  config.encoders, config.protocols = (RUN,), ("linear",)
  config.fractions, config.seeds, config.linear.c_grid = (1.0,), (0,), (1.0,)
  config.data.tfds_dir, config.data.num_threads = TFDS, 1
  config.data.image_size, config.data.stored_size = 32, 40
  config.model.image.depth, config.model.image.width, config.eval.batch_size = 18, 0.25, 32
  synthetic = config.data.synthetic
  synthetic.num_train, synthetic.num_validation, synthetic.num_test = 64, 32, 48
  synthetic.retrieval_per_category = synthetic.retrieval_queries_per_category = 0
  results = transfer_job.run(config, "gs://bucket/transfer")
  assert "linear" in results["methods"]["ConVIRT"]
  saved = json.loads(epath.Path("gs://bucket/transfer/results.json").read_text())
  assert saved["methods"].keys() == results["methods"].keys()
