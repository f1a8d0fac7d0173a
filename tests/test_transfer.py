"""The transfer job (convirt_jax.transfer): steps on 8 devices vs 1, exact resume, shared subsets, zero-shot,
encoder loading, bad inputs and the job end to end, on tiny encoders (ResNet18 at width 1/4 on 32 px, a
2-layer BERT of width 32) and a tiny synthetic labelled set.

The ConVIRT workdir is written directly (checkpoints of drawn weights, a corpus tokenizer, the BERT
config): the transfer job only reads it, and training one would compile the whole ConVIRT step.
"""
import hashlib
import inspect
import json
import os
import subprocess
import sys
import zlib

import flax
import jax
import ml_collections
import numpy as np
import optax
import pytest

import tiny_config
from convirt_jax import parallel
from convirt_jax.jobs import transfer_encoders
from convirt_jax.data import datasets
from convirt_jax.errors import CheckpointError, ConfigError, DataError
from convirt_jax.evaluate import linear_probe, zeroshot
from convirt_jax.jobs import transfer_finetune as finetune
from convirt_jax.models import classifier as classifier_lib
from convirt_jax.interop.torchvision_resnet import save_torchvision_resnet
from convirt_jax.models.bert import BertConfig
from convirt_jax.models import registry
from convirt_jax.models.convirt import build_model
from convirt_jax.tokenizer import Tokenizer
from convirt_jax.training import checkpoints, classifier_steps
from convirt_jax.training import state as state_lib
from convirt_jax.jobs import transfer as transfer_job

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATOL = 1e-5
SAVED_STEPS = {2: 3.0, 4: 2.0, 6: 2.5}   # step -> val/loss: best is 4, latest 6
LABELS = 8                                # the synthetic corpus's labels


# ----------------------------------------------------------------------------------------------------
# Fixtures: a ConVIRT workdir, the transfer config, the tiny data set, the job run once.


def _drawn(tree, seed: int):
  """Deterministic weights of a shape tree (each leaf from (seed, its path)): normal(0, 0.05), BatchNorm
  statistics 0 / 1."""
  out = {}
  for path, leaf in flax.traverse_util.flatten_dict(tree).items():
    if path[-1] == "var":
      out[path] = np.ones(leaf.shape, np.float32)
    elif path[-1] == "mean":
      out[path] = np.zeros(leaf.shape, np.float32)
    else:
      rng = np.random.default_rng([seed, zlib.crc32("/".join(path).encode())])
      out[path] = rng.normal(0.0, 0.05, leaf.shape).astype(np.float32)
  return flax.traverse_util.unflatten_dict(out)


def write_convirt_workdir(workdir: str, saved_steps: dict[int, float | None]) -> ml_collections.ConfigDict:
  """A pretraining workdir as `pretrain.run` leaves it, with weights drawn from the step as seed."""
  config = tiny_config.get_config()
  os.makedirs(workdir, exist_ok=True)
  from convirt_jax.data import synthetic_cxr  # pylint: disable=g-import-not-at-top
  corpus = [t for texts in synthetic_cxr.RETRIEVAL_TEXT_QUERIES.values() for t in texts]
  tokenizer = Tokenizer.from_corpus(corpus * 3, config.model.text.vocab_size,
                                    max_length=config.model.text.max_length)
  tokenizer.save(os.path.join(workdir, checkpoints.TOKENIZER_DIR))
  text_config = BertConfig.from_dict({**config.model.text.config.to_dict(),
                                      "vocab_size": tokenizer.vocab_size})
  with open(os.path.join(workdir, checkpoints.TEXT_CONFIG_FILE), "w") as f:
    json.dump(text_config.to_dict(), f)
  model = build_model(config, text_config)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *state_lib.dummy_inputs(
      config.data.image_size, config.model.text.max_length)))
  manager = checkpoints.make_manager(workdir, keep=len(saved_steps), best_metric="val/loss")
  for step, loss in saved_steps.items():
    state = {"step": np.int32(step), "params": _drawn(shapes["params"], step),
             "batch_stats": _drawn(shapes["batch_stats"], step), "rng": np.zeros((2,), np.uint32)}
    checkpoints.save(manager, step, state, meta={"config": config.to_dict(), "step": step},
                     metrics=None if loss is None else {"val/loss": loss})
  manager.wait_until_finished()
  manager.close()
  return config


def expected_image_variables(step: int):
  config = tiny_config.get_config()
  text_config = BertConfig.from_dict({**config.model.text.config.to_dict(), "vocab_size": 8})
  model = build_model(config, text_config)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *state_lib.dummy_inputs(
      config.data.image_size, config.model.text.max_length)))
  return {"params": _drawn(shapes["params"], step)["image"],
          "batch_stats": _drawn(shapes["batch_stats"], step)["image"]}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return str(tmp_path_factory.mktemp("transfer"))


@pytest.fixture(scope="module")
def convirt_dir(root):
  path = os.path.join(root, "pretrained")
  write_convirt_workdir(path, SAVED_STEPS)
  return path


@pytest.fixture(scope="module")
def job(root, convirt_dir):
  """The job run once on (ConVIRT, Random Init.), every call of the shared subset function recorded."""
  calls = []
  real = linear_probe.sample_training_subset

  def spy(positive, fraction, seed, min_train=10):
    subset = real(positive, fraction, seed, min_train)
    callers = [frame.function for frame in inspect.stack(context=0)[1:4]]
    caller = next((c for c in callers if c in ("linear_probe", "training_subsets")), callers[0])
    calls.append((caller, float(fraction), int(seed), hashlib.sha256(subset.tobytes()).hexdigest()))
    return subset

  workdir = os.path.join(root, "job")
  config = tiny_config.transfer(root, (convirt_dir, "random"))
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(linear_probe, "sample_training_subset", spy)
    results = transfer_job.run(config, workdir)
  return workdir, config, results, calls


@pytest.fixture(scope="module")
def dataset(job):
  _, config, _, _ = job
  return datasets.load_dataset(config, config.data.tfds_dir)


def arch():
  image = registry.ImageArch("resnet", (("depth", 18), ("width", 0.25), ("small_stem", False)))
  return transfer_encoders.Architecture(image, image_size=32)


# ----------------------------------------------------------------------------------------------------
# The job end to end.


def test_job_writes_results_of_every_protocol(job):
  workdir, config, results, _ = job
  for name in ("results.json", "results.md", "transfer_curves.png", "metrics.jsonl", "config.json"):
    assert os.path.isfile(os.path.join(workdir, name)), name
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  saved = json.load(open(os.path.join(workdir, "results.json")))
  assert list(saved["methods"]) == ["ConVIRT", "Random Init."]
  assert set(saved["methods"]["ConVIRT"]) == {"linear", "finetune", "zeroshot"}
  assert set(saved["methods"]["Random Init."]) == {"linear", "finetune"}  # zero-shot: ConVIRT only
  assert saved["metric"] == "auc" and saved["task"] == "multilabel"
  for method in saved["methods"].values():
    for protocol in ("linear", "finetune"):
      rows = method[protocol]["fractions"]
      assert [r["fraction"] for r in rows] == [0.1, 1.0]
      assert all(0.0 <= r["mean"] <= 1.0 for r in rows)
      assert set(rows[0]["per_label"]) == set(saved["label_names"])
  zs = saved["methods"]["ConVIRT"]["zeroshot"]
  assert 0.0 <= zs["main"] <= 1.0 and set(zs["per_label"]) == set(saved["label_names"])
  markdown = open(os.path.join(workdir, "results.md")).read()
  for heading in ("## Linear classification", "## Fine-tuning", "## Zero-shot", "| Random Init. |"):
    assert heading in markdown, heading
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  keys = {k for r in rows for k in r}
  assert "finetune/convirt/0.1/seed0/train/loss" in keys and "finetune/random/1/seed0/val/auc" in keys
  # A finished run is skipped: each has its result beside its checkpoints, and a rerun changes nothing.
  for slug in ("convirt", "random"):
    for fraction in ("0.1", "1"):
      assert os.path.isfile(os.path.join(workdir, "finetune", slug, fraction, "0", finetune.RESULT_FILE))
  again = transfer_job.run(config, workdir)
  assert json.dumps(again["methods"], sort_keys=True) == json.dumps(results["methods"], sort_keys=True)


def test_linear_and_finetune_train_on_identical_subsets(job):
  workdir, config, results, calls = job
  callers = {c[0] for c in calls}
  assert {"linear_probe", "training_subsets"} <= callers, callers
  for fraction in config.fractions:
    for seed in config.seeds:
      hashes = {c[3] for c in calls if c[1:3] == (fraction, seed)}
      assert len(hashes) == 1, (fraction, seed, calls)
      run_dir = os.path.join(workdir, "finetune", "convirt", f"{fraction:g}", str(seed))
      saved = json.load(open(os.path.join(run_dir, finetune.RESULT_FILE)))
      assert saved["settings"]["subset_sha256"] == hashes.pop()
  for method in results["methods"].values():
    linear_sizes = [r["n_train"] for r in method["linear"]["fractions"]]
    finetune_sizes = [r["n_train"] for r in method["finetune"]["fractions"]]
    assert linear_sizes == finetune_sizes


def test_classification_losses_match_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 3)).astype(np.float32)
  labels = rng.integers(0, 2, size=(6, 3)).astype(np.float32)
  labels[0, 1] = labels[3, 2] = np.nan
  labels[1, 0] = -1.0  # uncertain: a negative target, as the probes count it
  total, count = classifier_steps.classification_loss_sums(logits, labels, "multilabel")
  known = ~np.isnan(labels)
  target = (labels == 1.0).astype(np.float64)
  bce = np.logaddexp(0, logits) - target * logits
  assert float(count) == known.sum()
  np.testing.assert_allclose(float(total) / float(count), bce[known].mean(), rtol=1e-5)
  onehot = np.eye(3, dtype=np.float32)[[0, 2, 1, 1, 0, 2]]
  total, count = classifier_steps.classification_loss_sums(logits, onehot, "multiclass")
  log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
  np.testing.assert_allclose(float(total) / float(count), -(onehot * log_softmax).sum(1).mean(), rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Data parallelism and resume.


def test_finetune_step_8_devices_equals_1_device(job):
  _, config, _, _ = job
  model = transfer_job.classifier_model(config, arch(), LABELS)
  variables = classifier_lib.classifier_variables(model, registry.random_variables(arch().image, 32, 3), 0)
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, size=(16, LABELS)).astype(np.float32)
  labels[rng.random(labels.shape) < 0.2] = np.nan
  batch = {"image": rng.integers(0, 256, size=(16, 32, 32, 3), dtype=np.uint8), "labels": labels}
  outputs = {}
  for devices in (8, 1):
    mesh = parallel.make_mesh() if devices == 8 else parallel.make_mesh(jax.devices()[:1])
    optimizer, step, _ = finetune.compiled_steps(model, "multilabel", mesh, config.finetune.lr,
                                                 config.finetune.weight_decay)
    state = parallel.replicate(state_lib.new_state(variables, optimizer, jax.random.PRNGKey(0)), mesh)
    state, metrics = step(state, parallel.shard_batch(batch, mesh))
    outputs[devices] = parallel.fetch((state, metrics))
  (state8, metrics8), (state1, metrics1) = outputs[8], outputs[1]
  assert abs(float(metrics8["loss"]) - float(metrics1["loss"])) <= ATOL
  # Adam's first moment after one update is (1 - b1) * (gradient + wd * p): the gradient, compared directly.
  mu8, mu1 = (optax.tree_utils.tree_get(s["opt_state"], "mu") for s in (state8, state1))
  gradient_diff = max(float(np.max(np.abs(a - b)))
                      for a, b in zip(jax.tree.leaves(mu8), jax.tree.leaves(mu1)))
  assert gradient_diff / 0.1 <= ATOL
  stats_diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(state8["batch_stats"]),
                                                                 jax.tree.leaves(state1["batch_stats"])))
  assert stats_diff <= ATOL
  # Not vacuous: the statistics moved and the gradient is not zero.
  initial = jax.tree.leaves(variables["batch_stats"])
  assert all(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(state1["batch_stats"]), initial))
  assert 1e-3 < float(metrics1["grad_norm"]) < 1e3


class _StopAt:
  """A preemption flag that is set from a given step on (what SIGTERM does to the real one)."""

  def __init__(self, step):
    self.step = step

  def is_set(self, manager, step):
    del manager
    return step >= self.step


def _final_state(directory):
  manager = checkpoints.make_manager(directory, read_only=True)
  try:
    step = manager.latest_step()
    restored = manager.restore(step, args=checkpoints.ocp.args.Composite(
        **{checkpoints.STATE: checkpoints.ocp.args.StandardRestore()}))
    return step, restored[checkpoints.STATE]
  finally:
    manager.close()


def test_interrupted_finetuning_resumes_exactly(job, dataset, root, monkeypatch):
  _, config, _, _ = job
  config = ml_collections.ConfigDict(config.to_dict())
  config.finetune.patience = 1  # early-stopping bookkeeping is part of what must resume
  config.finetune.eval_every_steps = 3
  # The accelerators' default: the step draws the augmentations from its state (host mode resumes in
  # test_transfer_multiprocess.py).
  config.data.augment_on = "device"
  model = transfer_job.classifier_model(config, arch(), LABELS)
  mesh = parallel.make_mesh()
  encoder = registry.random_variables(arch().image, 32, 5)
  train_labels = transfer_job._split_labels(dataset.sources["train"])
  subset = finetune.training_subsets(train_labels, dataset.label_names, (0.5,), (7,), 10)[(0.5, 7)]

  def finetuner(preempted=None):
    return finetune.Finetuner(model, config, "multilabel", dataset.label_names, dataset.sources, mesh,
                              identity={"test": 1}, preempted=preempted)

  def make_run(name):
    return finetune.Run("Random", "random", 0.5, 7, subset, 9, os.path.join(root, "resume", name))

  reference = finetuner().run(make_run("whole"), encoder)
  assert reference["steps_run"] in (6, 9)  # 6: stopped early, the evaluation at 6 did not improve
  # SIGTERM after step 2: a checkpoint at 2 and no result; the same call again finishes the run.
  assert finetuner(_StopAt(2)).run(make_run("sigterm"), encoder) is None
  assert _final_state(make_run("sigterm").directory)[0] == 2
  assert not os.path.exists(os.path.join(make_run("sigterm").directory, finetune.RESULT_FILE))
  resumed = finetuner().run(make_run("sigterm"), encoder)
  # An exception after step 5: the run resumes from its last checkpoint (step 3).
  crashing = finetuner()
  real_step = crashing.train_step
  count = {"n": 0}

  def crash_after_5(state, batch):
    count["n"] += 1
    if count["n"] > 5:
      raise RuntimeError("simulated crash")
    return real_step(state, batch)

  crashing.train_step = crash_after_5
  with pytest.raises(RuntimeError, match="simulated crash"):
    crashing.run(make_run("crash"), encoder)
  assert _final_state(make_run("crash").directory)[0] == 3
  crashed = finetuner().run(make_run("crash"), encoder)

  whole_step, whole = _final_state(make_run("whole").directory)
  for name, result in (("sigterm", resumed), ("crash", crashed)):
    step, state = _final_state(make_run(name).directory)
    assert step == whole_step
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(whole["params"])):
      np.testing.assert_array_equal(a, b, err_msg=name)
    for a, b in zip(jax.tree.leaves(state["batch_stats"]), jax.tree.leaves(whole["batch_stats"])):
      np.testing.assert_array_equal(a, b, err_msg=name)
    assert result["test"] == reference["test"] and result["evaluated_step"] == reference["evaluated_step"]
  # A finished run is read back, not trained again; other settings in its directory are refused.
  assert finetuner().run(make_run("whole"), encoder) == json.loads(json.dumps(reference))
  config.finetune.lr = 5e-4
  with pytest.raises(ConfigError, match="finetune"):
    finetune.Finetuner(model, config, "multilabel", dataset.label_names, dataset.sources, mesh,
                       identity={"test": 1}).run(make_run("whole"), encoder)


class _Recorder:
  """A MetricLogger that keeps what it is given."""

  def __init__(self):
    self.rows = []

  def write(self, step, metrics):
    self.rows.append((step, dict(metrics)))

  def flush(self):
    pass


def test_finetuning_with_adamw_warmup_cosine_and_layer_decay_follows_its_schedule_and_resumes(job, dataset,
                                                                                                root):
  _, config, _, _ = job
  config = ml_collections.ConfigDict(config.to_dict())
  config.finetune.update(optimizer="adamw", warmup_steps=3, schedule="cosine", layer_decay=0.7,
                         weight_decay=0.05, log_every_steps=1, eval_every_steps=3, patience=0)
  model = transfer_job.classifier_model(config, arch(), LABELS)
  mesh = parallel.make_mesh()
  encoder = registry.random_variables(arch().image, 32, 5)
  train_labels = transfer_job._split_labels(dataset.sources["train"])
  subset = finetune.training_subsets(train_labels, dataset.label_names, (0.5,), (7,), 10)[(0.5, 7)]
  run = lambda name: finetune.Run("Random", "random", 0.5, 7, subset, 8, os.path.join(root, "recipe", name))
  logger = _Recorder()
  make = lambda preempted=None: finetune.Finetuner(model, config, "multilabel", dataset.label_names,
                                                   dataset.sources, mesh, identity={"test": 2}, logger=logger,
                                                   preempted=preempted)
  reference = make().run(run("whole"), encoder)
  lrs = [m[f"{run('whole').prefix}/train/lr"] for _, m in logger.rows if f"{run('whole').prefix}/train/lr" in m]
  np.testing.assert_allclose(lrs, finetune.learning_rates(config.finetune.lr, 8, 3, "cosine"), rtol=1e-6)
  assert lrs[0] == 0 and lrs[3] == pytest.approx(config.finetune.lr) and lrs[-1] < 0.1 * config.finetune.lr
  assert make(_StopAt(4)).run(run("sigterm"), encoder) is None
  resumed = make().run(run("sigterm"), encoder)
  (_, whole), (_, state) = _final_state(run("whole").directory), _final_state(run("sigterm").directory)
  for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(whole["params"])):
    np.testing.assert_array_equal(a, b)
  assert resumed["test"] == reference["test"]
  saved = json.load(open(os.path.join(run("whole").directory, finetune.RESULT_FILE)))["settings"]["finetune"]
  assert saved["optimizer"] == "adamw" and saved["layer_decay"] == 0.7 and saved["schedule"] == "cosine"


# ----------------------------------------------------------------------------------------------------
# Scores.


def test_zeroshot_equals_hand_computation():
  rng = np.random.default_rng(1)
  image_emb = rng.normal(size=(12, 4))
  labels = np.zeros((12, 3), np.float32)
  labels[[0, 3, 5, 8], 0] = 1
  labels[[1, 2, 5, 9, 11], 1] = 1
  labels[:, 2] = 0  # no positive: excluded with its reason
  prompt_emb = {"a a": rng.normal(size=4), "b b": rng.normal(size=4), "c c": rng.normal(size=4),
                "d d": rng.normal(size=4)}
  prompts = {"x": ["a a", "b b"], "y": ["c c"], "z": ["d d"]}
  encode = lambda texts: np.stack([prompt_emb[t] for t in texts])
  class_emb = zeroshot.class_embeddings(prompts, encode)
  unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)
  want_x = unit(unit(prompt_emb["a a"]) + unit(prompt_emb["b b"]))
  np.testing.assert_allclose(class_emb["x"], want_x, rtol=1e-12)
  result = zeroshot.evaluate_zeroshot(image_emb, labels, ["x", "y", "z"], "multilabel", class_emb)
  scores = unit(image_emb) @ np.stack([want_x, unit(prompt_emb["c c"]), unit(prompt_emb["d d"])]).T

  def auc(positive, score):  # probability that a positive outranks a negative (ties count half)
    pos, neg = score[positive], score[~positive]
    return float(np.mean((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])))

  want = [auc(labels[:, j] == 1, scores[:, j]) for j in range(2)]
  assert result["per_label"]["x"] == pytest.approx(want[0])
  assert result["per_label"]["y"] == pytest.approx(want[1])
  assert result["per_label"]["z"] is None and "z" in result["excluded_labels"]
  assert result["main"] == pytest.approx(np.mean(want))
  onehot = np.eye(3, dtype=np.float32)[[0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2]]
  result = zeroshot.evaluate_zeroshot(image_emb, onehot, ["x", "y", "z"], "multiclass", class_emb)
  assert result["main"] == pytest.approx(np.mean(scores.argmax(1) == onehot.argmax(1)))


def test_small_subsets_exclude_single_class_labels_instead_of_failing():
  labels = np.zeros((40, 2), np.float32)
  labels[::2, 0] = 1.0
  labels[5, 1] = 1.0  # a single positive in the pool
  runs = [finetune.Run("E", "e", 0.1, 0, np.arange(4), 4, "/nowhere")]  # no positive of label 1
  test = {"main": 0.7, "per_label": {"a": 0.7, "b": 0.6}, "excluded_labels": {}}
  outcome = {"n_train": 4, "n_test": 10, "steps_run": 4, "evaluated_step": 4, "stopped_early": False,
             "val_metric": 0.6, "test": test}
  summary = finetune.summarise({(0.1, 0): outcome}, runs, ["a", "b"], "multilabel", labels, (0.1,), (0,))
  assert summary["fractions"][0]["per_label"]["b"] is None
  assert "single class in the training subset" in summary["excluded_labels"]["b"]
  assert summary["fractions"][0]["mean"] == pytest.approx(0.7)
  scores = finetune.score_predictions(np.zeros((3, 2)), np.array([[1, 0], [0, 0], [1, 0]], np.float32),
                                      ["a", "b"], "multilabel")
  assert scores["per_label"]["b"] is None and scores["excluded_labels"]["b"] == "single class in the test set"


# ----------------------------------------------------------------------------------------------------
# Encoders.


def _assert_tree_equal(got, want):
  flat_got, flat_want = (flax.traverse_util.flatten_dict(t) for t in (got, want))
  assert flat_got.keys() == flat_want.keys()
  for key in flat_want:
    np.testing.assert_array_equal(np.asarray(flat_got[key]), np.asarray(flat_want[key]), err_msg=str(key))


def test_loading_each_encoder_kind(convirt_dir, root, caplog):
  config = tiny_config.transfer(root, ())
  for spec, step in ((convirt_dir, 4), (f"{convirt_dir}@best", 4), (f"{convirt_dir}@latest", 6),
                     (f"{convirt_dir}@2", 2)):
    config.encoders = (spec,)
    (encoder,) = transfer_encoders.parse_encoders(config)
    assert (encoder.name, encoder.step) == ("ConVIRT", step)
    _assert_tree_equal(transfer_encoders.load_encoder(encoder, arch(), config),
                       expected_image_variables(step))
  # Several ConVIRT encoders: rows named after the workdir (and the step where that is ambiguous).
  config.encoders = (convirt_dir, f"{convirt_dir}@latest", "random")
  assert [e.name for e in transfer_encoders.parse_encoders(config)] == [
      "pretrained@4", "pretrained@6", "Random Init."]
  # A workdir without a validation loss: "best" is the latest step, with a warning.
  no_best = os.path.join(root, "no_best")
  write_convirt_workdir(no_best, {1: None, 3: None})
  config.encoders = (no_best,)
  (encoder,) = transfer_encoders.parse_encoders(config)
  assert encoder.step == 3
  assert "using the latest" in caplog.text
  # torchvision weights written as a file; random weights: deterministic, torchvision's initialisation.
  weights = registry.random_variables(arch().image, 32, 11)
  path = os.path.join(root, "resnet18.safetensors")
  save_torchvision_resnet(weights, path)
  config.encoders, config.imagenet_weights = ("imagenet", "random"), path
  imagenet, random = transfer_encoders.parse_encoders(config)
  assert (imagenet.name, random.name) == ("ImageNet Init.", "Random Init.")
  _assert_tree_equal(transfer_encoders.load_encoder(imagenet, arch(), config), weights)
  config.random_init_seed = 11
  _assert_tree_equal(transfer_encoders.load_encoder(random, arch(), config), weights)
  kernel = weights["params"]["layer2_0"]["conv2"]["kernel"]  # 3x3, 32 out: std sqrt(2 / (9 * 32))
  assert np.std(kernel) == pytest.approx(np.sqrt(2 / (9 * kernel.shape[-1])), rel=0.1)
  # Another architecture's weights are refused, naming the config key.
  config.model.image.width = 0.5
  with pytest.raises(CheckpointError, match="config.imagenet_weights"):
    transfer_encoders.load_encoder(imagenet, transfer_encoders.resolve_architecture([imagenet], config),
                                   config)


# ----------------------------------------------------------------------------------------------------
# Bad input: one clear error before anything compiles.


def _bad(root, convirt_dir, **changes):
  config = tiny_config.transfer(root, (convirt_dir, "random"))
  config.update_from_flattened_dict({key.replace("__", "."): value for key, value in changes.items()})
  return config


@pytest.mark.parametrize("changes, error, match", [
    ({"encoders": ("{empty}",)}, CheckpointError, "is not a ConVIRT workdir"),
    ({"encoders": ("/no/such/run",)}, ConfigError, "config.encoders has '/no/such/run'"),
    ({"encoders": ("imagenett",)}, ConfigError, "'imagenett': not \"imagenet\", \"random\""),
    ({"encoders": ("{convirt}@9",)}, CheckpointError, "no checkpoint at step 9"),
    ({"encoders": ("{convirt}@best-ish",)}, ConfigError, "after '@'"),
    ({"encoders": ("imagenet",), "imagenet_weights": "/no/weights.pth", "protocols": ("linear",)},
     ConfigError, "config.imagenet_weights='/no/weights.pth'"),
    ({"encoders": ("random",)}, ConfigError, "'zeroshot', which needs a ConVIRT encoder"),
    ({"fractions": (0.1, 0.0)}, ConfigError, "config.fractions has 0.0"),
    ({"fractions": (1.5,)}, ConfigError, "config.fractions has 1.5"),
    ({"protocols": ("linear", "probe")}, ConfigError, "config.protocols has 'probe'"),
    ({"finetune__batch_size": 12}, ConfigError, "config.finetune.batch_size"),
    ({"data__task": "binary"}, ConfigError, "config.data.task='binary' needs exactly one label"),
])
def test_bad_input_gives_a_clear_error(root, convirt_dir, changes, error, match):
  os.makedirs(os.path.join(root, "empty"), exist_ok=True)
  def fill(value):
    if not isinstance(value, str):
      return value
    return value.format(empty=os.path.join(root, "empty"), convirt=convirt_dir)

  changes = {k: tuple(fill(x) for x in v) if isinstance(v, tuple) else fill(v) for k, v in changes.items()}
  with pytest.raises(error, match=match):
    transfer_job.run(_bad(root, convirt_dir, **changes), os.path.join(root, "bad"))


def test_csv_without_the_label_columns_is_refused(root, convirt_dir):
  csv = os.path.join(root, "labels.csv")
  with open(csv, "w") as f:
    f.write("image,text,effusion\na.png,No effusion.,0\n")
  config = _bad(root, convirt_dir, data__name="csv", data__csv=csv, protocols=("linear",))
  config.data.label_columns = ("effusion", "pneumonia")
  with pytest.raises(DataError, match="missing required column 'pneumonia'"):
    transfer_job.run(config, os.path.join(root, "bad_csv"))


def test_prompts_for_labels_a_csv_does_not_have_stop_the_job_before_anything_is_built(root, convirt_dir):
  """The labels of a CSV are in the config: the zero-shot prompts are checked against them before the
  data set is built, and the failed command leaves no workdir and no dataset directory."""
  csv = os.path.join(root, "covid.csv")
  with open(csv, "w") as f:
    f.write("image,text,covid,bacterial,no_finding\na.png,Clear lungs.,0,0,1\n")
  config = _bad(root, convirt_dir, data__name="csv", data__csv=csv,
                data__tfds_dir=os.path.join(root, "covid_tfds"))
  config.data.label_columns = ("covid", "bacterial", "no_finding")
  workdir = os.path.join(root, "covid_run")
  with pytest.raises(ConfigError, match=r"config.zeroshot.prompts has labels \[.*\] that the data set "
                                        r"does not have \(its labels: \['covid', 'bacterial', 'no_finding'\]\)"):
    transfer_job.run(config, workdir)
  assert not os.path.exists(workdir) and not os.path.exists(config.data.tfds_dir)


def test_cli_prints_one_line_naming_the_missing_pretraining_run(root):
  result = subprocess.run(
      [sys.executable, "-m", "convirt_jax.transfer", "--config=configs/transfer/synthetic.py",
       f"--workdir={os.path.join(root, 'cli')}", f"--config.encoders=('{root}/synthetic',)"],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode != 0
  assert "Traceback" not in result.stderr
  lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1, result.stderr
  assert "python -m convirt_jax.main --config=configs/synthetic.py" in lines[0]
