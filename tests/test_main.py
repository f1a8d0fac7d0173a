"""The main job end to end on a tiny synthetic config: files, resume, preemption, NaN stop, bad configs."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from convirt_jax import checkpoints, train
from convirt_jax.errors import ConfigError, DataError, TrainingDiverged
import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "tests", "tiny_config.py")


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def tiny(tfds_dir, **overrides):
  config = tiny_config.get_config()
  config.data.tfds_dir = tfds_dir
  for key, value in overrides.items():
    section, name = key.split("__")
    config[section][name] = value
  return config


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tfds_dir):
  workdir = str(tmp_path_factory.mktemp("run"))
  results = train.run(tiny(tfds_dir), workdir)
  return workdir, results


def final_params(workdir):
  manager = checkpoints.make_manager(workdir, read_only=True)
  step = manager.latest_step()
  from convirt_jax.api import ConVIRT  # pylint: disable=g-import-not-at-top
  return step, ConVIRT.load(workdir).variables


def test_run_writes_everything_a_user_needs(finished_run):
  workdir, results = finished_run
  for name in ("config.json", "metrics.jsonl", "results.json", "results.md", "loss_curve.png",
               "probe_curves.png", "retrieval_examples.png", "text_config.json", "tokenizer"):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  train_steps = [r["step"] for r in rows if "train/loss" in r]
  assert train_steps == [2, 4, 6]
  assert [r["step"] for r in rows if "val/loss" in r] == [3, 6]
  assert all(np.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
  saved = json.load(open(os.path.join(workdir, "results.json")))
  assert set(saved["methods"]) == {"ConVIRT", "Random Init."}
  convirt = saved["methods"]["ConVIRT"]
  probe = convirt["linear_probe"]["Synthetic CXR"]
  assert [f["fraction"] for f in probe["fractions"]] == [0.01, 0.1, 1.0]
  assert set(convirt["retrieval"]) == {"image_to_image", "text_to_image"}
  assert convirt["retrieval"]["text_to_image"]["chance"] == pytest.approx(1 / 8)
  assert "| ConVIRT |" in open(os.path.join(workdir, "results.md")).read()
  assert results["methods"].keys() == saved["methods"].keys()
  manager = checkpoints.make_manager(workdir, read_only=True)
  assert manager.latest_step() == 6
  # keep=2 latest (4, 6) plus the best validation loss (3 or 6).
  assert {4, 6} <= set(manager.all_steps()) <= {3, 4, 6}


def _wrap_train_step(monkeypatch, after_step):
  """Makes every train step call `after_step(step_number, metrics)`; returns nothing."""
  real = train.make_train_step

  def wrapped(*args, **kwargs):
    step_fn = real(*args, **kwargs)

    def train_step(state, batch):
      state, metrics = step_fn(state, batch)
      return state, after_step(int(jax.device_get(state["step"])), metrics)
    return train_step

  monkeypatch.setattr(train, "make_train_step", wrapped)


def test_sigterm_saves_and_resume_gives_exactly_the_uninterrupted_parameters(
    finished_run, tmp_path, tfds_dir, monkeypatch):
  uninterrupted_dir, _ = finished_run
  workdir = str(tmp_path / "interrupted")
  def sigterm_at_3(step, metrics):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)  # as a preemption notice would
    return metrics

  _wrap_train_step(monkeypatch, sigterm_at_3)
  assert train.run(tiny(tfds_dir), workdir) == {}  # stopped: no evaluation
  manager = checkpoints.make_manager(workdir, read_only=True)
  assert manager.latest_step() == 3
  monkeypatch.undo()
  train.run(tiny(tfds_dir), workdir)  # the same command resumes at step 3 and finishes
  step_a, a = final_params(uninterrupted_dir)
  step_b, b = final_params(workdir)
  assert step_a == step_b == 6
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  train_steps = [r["step"] for r in rows if "train/loss" in r]
  assert train_steps == sorted(set(train_steps)), "a resumed run logs each step once"


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tfds_dir, monkeypatch):
  _wrap_train_step(monkeypatch, lambda step, metrics: (
      dict(metrics, loss=metrics["loss"] * np.nan) if step >= 3 else metrics))
  workdir = str(tmp_path / "nan")
  with pytest.raises(TrainingDiverged, match="nan"):
    train.run(tiny(tfds_dir, eval__every_steps=100), workdir)
  manager = checkpoints.make_manager(workdir, read_only=True)
  assert manager.all_steps() == [2]


def test_bad_configs_fail_before_anything_compiles(tmp_path, tfds_dir):
  with pytest.raises(ConfigError, match="train.batch_size"):
    train.run(tiny(tfds_dir, train__batch_size=12), str(tmp_path / "a"))  # 8 devices
  config = tiny(tfds_dir)
  config.train.batchsize = 16
  with pytest.raises(ConfigError, match="config.train.batchsize"):
    train.run(config, str(tmp_path / "b"))
  with pytest.raises(ConfigError, match="config.data.csv"):
    train.run(tiny(tfds_dir, data__name="csv"), str(tmp_path / "c"))
  with pytest.raises(DataError, match="missing.csv"):
    train.run(tiny(tfds_dir, data__name="csv", data__csv=str(tmp_path / "missing.csv")),
              str(tmp_path / "d"))


def test_resuming_with_another_model_is_refused(finished_run, tfds_dir):
  workdir, _ = finished_run
  with pytest.raises(ConfigError, match="model.projection_dim"):
    train.run(tiny(tfds_dir, model__projection_dim=8), workdir)


def _main(*args, **kwargs):
  return subprocess.run([sys.executable, "-m", "convirt_jax.main", *args], cwd=REPO,
                        capture_output=True, text=True, **kwargs)


def test_main_without_mimic_files_names_the_dataset_and_layout(tmp_path):
  result = _main("--config=configs/mimic.py", f"--workdir={tmp_path}",
                 f"--config.data.dir={tmp_path / 'nowhere'}", timeout=300)
  assert result.returncode != 0
  assert "MIMIC-CXR-JPG" in result.stderr and "physionet.org" in result.stderr
  assert "Traceback" not in result.stderr


def test_main_rejects_an_unknown_override_key(tmp_path):
  result = _main(f"--config={TINY}", f"--workdir={tmp_path}", "--config.train.batchsize=3", timeout=300)
  assert result.returncode != 0 and "batchsize" in result.stderr


def test_kill_9_then_the_same_command_resumes_and_finishes(tmp_path, tfds_dir):
  workdir = tmp_path / "killed"
  command = [sys.executable, "-m", "convirt_jax.main", f"--config={TINY}", f"--workdir={workdir}",
             f"--config.data.tfds_dir={tfds_dir}", "--config.train.steps=40",
             "--config.eval.every_steps=100", "--config.checkpoint.every_steps=4"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckpt_dir = workdir / "checkpoints"
  deadline = time.monotonic() + 300
  while time.monotonic() < deadline and proc.poll() is None:
    if ckpt_dir.exists() and any(p.name.isdigit() for p in ckpt_dir.iterdir()):
      break
    time.sleep(0.2)
  assert proc.poll() is None, "the run ended before it could be killed"
  proc.kill()  # SIGKILL: no chance to save
  proc.wait()
  killed_at = checkpoints.make_manager(str(workdir), read_only=True).latest_step()
  assert killed_at is not None and killed_at < 40
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"Resuming from step {killed_at}" in result.stdout
  assert checkpoints.make_manager(str(workdir), read_only=True).latest_step() == 40
  assert os.path.exists(workdir / "results.json")


def test_init_from_a_torchvision_file_adds_the_imagenet_baseline(tmp_path, tfds_dir):
  from convirt_jax.interop.torchvision_resnet import save_torchvision_resnet  # pylint: disable=g-import-not-at-top
  from convirt_jax.models.resnet import ResNet  # pylint: disable=g-import-not-at-top
  weights = ResNet(depth=18, width=0.25).init(jax.random.key(3), np.zeros((1, 32, 32, 3), np.float32))
  save_torchvision_resnet(weights, str(tmp_path / "resnet18.safetensors"))
  config = tiny(tfds_dir, train__steps=2, eval__every_steps=2)
  config.model.image.init_from = str(tmp_path / "resnet18.safetensors")
  results = train.run(config, str(tmp_path / "run"))
  assert list(results["methods"]) == ["ConVIRT", "ImageNet Init.", "Random Init."]
