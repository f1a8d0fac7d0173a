"""The fine-tuning protocol of the transfer job: every encoder weight + a new linear head, per label fraction.

For each (encoder, fraction, seed) a run trains, on the training engine (`training.engine`: the loop and
the update step pretraining runs too), `models.classifier.ImageClassifier` (the encoder's
ResNet and a linear head) with Adam on the training subset of that fraction and seed (the subset the
linear protocol uses too: `training_subsets`), with the training augmentations (`pipeline.train_loader`
with config.augment), data parallel over every device with synchronised BatchNorm. Every
`finetune.eval_every_steps` steps (and at the end) the validation metric is computed (mean AUC, or
accuracy for multiclass); the run stops after `finetune.patience` evaluations without improvement, and the
checkpoint with the best validation metric is the one scored on the test split.

Each run lives in <workdir>/finetune/<encoder>/<fraction>/<seed>/: orbax checkpoints (the last
`finetune.keep` plus the best; state, data iterator and the early-stopping bookkeeping), so an interrupted
run resumes exactly, and result.json once it is finished, so a finished run is skipped on rerun. A
directory written with other settings is refused rather than mixed in.

Scores follow `linear_probe`'s conventions (positive = label == 1; AUC per label and their mean, or
accuracy and one-vs-rest AUCs for multiclass; a label with a single class in the test set or in a run's
training subset is excluded with its reason).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import flax
import jax
import ml_collections
import numpy as np
import optax

from convirt_jax import parallel
from convirt_jax import storage
from convirt_jax.data import device_augment
from convirt_jax.data import pipeline
from convirt_jax.data.augment import TrainAugment
from convirt_jax.errors import ConfigError
from convirt_jax.evaluate import features as features_lib
from convirt_jax.evaluate import linear_probe
from convirt_jax.models import registry as image_registry
from convirt_jax.models import classifier as classifier_lib
from convirt_jax.models.classifier import ImageClassifier
from convirt_jax.training import checkpoints
from convirt_jax.training import engine
from convirt_jax.training import classifier_steps
from convirt_jax.training import metric_logging
from convirt_jax.training import optimizer as optimizer_lib
from convirt_jax.training import preemption
from convirt_jax.training import state as state_lib

RESULT_FILE = "result.json"
BEST_METRIC = "val/neg_metric"  # the checkpoint manager keeps the lowest: the negated validation metric


# ----------------------------------------------------------------------------------------------------
# Subsets and scores (shared with the other protocols).


def training_subsets(train_labels: np.ndarray, label_names: Sequence[str], fractions: Sequence[float],
                     seeds: Sequence[int], min_train: int) -> dict[tuple[float, int], np.ndarray]:
  """{(fraction, seed): sorted row indices}: `linear_probe.sample_training_subset` on the binarised
  training labels, the very call `linear_probe.linear_probe` makes, so both protocols train on the same
  rows."""
  positive = linear_probe.binarize_labels(train_labels, label_names, "train labels")
  return {(float(f), int(s)): linear_probe.sample_training_subset(positive, float(f), int(s), min_train)
          for f in fractions for s in seeds}


def _softmax(x: np.ndarray) -> np.ndarray:
  x = x - x.max(axis=1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(axis=1, keepdims=True)


def score_predictions(scores: np.ndarray, labels: np.ndarray, label_names: Sequence[str],
                      task: str) -> dict[str, Any]:
  """{"main": mean AUC (multilabel / binary) or accuracy (multiclass), "per_label": {name: AUC or None},
  "excluded_labels": {name: reason}} of logits `scores` [N, L]; multiclass adds "auc_macro"."""
  label_names = [str(n) for n in label_names]
  positive = linear_probe.binarize_labels(labels, label_names, "labels")
  scores = np.asarray(scores, np.float64)
  excluded = {n: "single class in the test set" for j, n in enumerate(label_names)
              if positive[:, j].all() or not positive[:, j].any()}
  ranked = _softmax(scores) if task == "multiclass" else scores
  auc = linear_probe._auc_or_none  # pylint: disable=protected-access
  per_label = {n: None if n in excluded else auc(positive[:, j], ranked[:, j])
               for j, n in enumerate(label_names)}
  valid = [v for v in per_label.values() if v is not None]
  mean_auc = float(np.mean(valid)) if valid else None
  if task == "multiclass":
    accuracy = float(np.mean(scores.argmax(axis=1) == positive.argmax(axis=1)))
    return {"main": accuracy, "per_label": per_label, "excluded_labels": excluded, "auc_macro": mean_auc}
  return {"main": mean_auc, "per_label": per_label, "excluded_labels": excluded}


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
  values = [v for v in values if v is not None]
  if not values:
    return None, None
  return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


# ----------------------------------------------------------------------------------------------------
# Runs.


@dataclasses.dataclass(frozen=True)
class Run:
  """One fine-tuning run: an encoder on the training subset of one (fraction, seed)."""
  encoder: str          # the results' row name
  slug: str             # the encoder's directory name
  fraction: float
  seed: int
  subset: np.ndarray    # sorted row indices into the training split
  steps: int            # planned steps (early stopping may end it sooner)
  directory: str

  @property
  def prefix(self) -> str:
    """The run's prefix in metrics.jsonl / TensorBoard."""
    return f"finetune/{self.slug}/{self.fraction:g}/seed{self.seed}"


def plan_steps(num_train: int, settings: ml_collections.ConfigDict) -> int:
  """Steps of a run on `num_train` examples: finetune.epochs over them, at least min_steps, at most
  max_steps (when set)."""
  steps = math.ceil(settings.epochs * num_train / settings.batch_size)
  steps = max(steps, int(settings.min_steps), 1)
  return min(steps, int(settings.max_steps)) if settings.max_steps else steps


def check_recipe(subsets: Mapping[tuple[float, int], np.ndarray], settings: ml_collections.ConfigDict,
                 arch: image_registry.ImageArch) -> None:
  """Raises ConfigError, before anything compiles, for recipe options a run cannot follow."""
  for (fraction, seed), subset in subsets.items():
    steps = plan_steps(len(subset), settings)
    if settings.warmup_steps >= steps:
      raise ConfigError(f"config.finetune.warmup_steps={settings.warmup_steps} is not below the {steps} "
                        f"steps of the fine-tuning run at fraction {fraction:g}, seed {seed}")
  if settings.layer_decay != 1:
    image_registry.check_layers(arch)


def make_runs(workdir: str, encoder_name: str, slug: str, subsets: Mapping[tuple[float, int], np.ndarray],
              settings: ml_collections.ConfigDict) -> list[Run]:
  return [Run(encoder_name, slug, fraction, seed, subset, plan_steps(len(subset), settings),
              os.path.join(workdir, "finetune", slug, f"{fraction:g}", str(seed)))
          for (fraction, seed), subset in subsets.items()]


def completed_steps(run: Run) -> int:
  """Steps already done: all of them once result.json exists, else the latest checkpoint's step."""
  if storage.exists(os.path.join(run.directory, RESULT_FILE)):
    return run.steps
  if not storage.path(checkpoints.checkpoint_dir(run.directory)).is_dir():
    return 0
  reader = checkpoints.make_manager(run.directory, read_only=True)
  try:
    return min(int(reader.latest_step() or 0), run.steps)
  finally:
    reader.close()




def _check_settings(saved: Mapping[str, Any], settings: Mapping[str, Any], directory: str) -> None:
  saved, settings = metric_logging.jsonable(saved), metric_logging.jsonable(settings)
  for key in sorted(set(saved) | set(settings)):
    if saved.get(key) != settings.get(key):
      raise ConfigError(f"{directory} holds a fine-tuning run with {key}={saved.get(key)!r}; this config "
                        f"gives {settings.get(key)!r}: use another --workdir (or delete that directory)")


# The paper's recipe (torch.optim.Adam, L2 weight decay, one learning rate, no schedule) and the options
# ViTs are usually fine-tuned with; a run records the options only where they differ from these.
RECIPE_DEFAULTS = {"optimizer": "adam", "warmup_steps": 0, "schedule": "constant", "layer_decay": 1.0}


def recipe_options(settings: ml_collections.ConfigDict) -> dict[str, Any]:
  """The finetune.* recipe options that differ from the paper's (RECIPE_DEFAULTS)."""
  return {k: settings[k] for k, default in RECIPE_DEFAULTS.items() if settings[k] != default}


def learning_rates(lr: float, steps: int, warmup_steps: int, schedule: str) -> np.ndarray:
  """The learning rate of each of a run's `steps` updates: a linear warm-up from 0 over `warmup_steps`,
  then `lr` ("constant") or a cosine decay to 0 at the last step ("cosine"). The loop sets it before
  every update, so runs of every length share one compiled step."""
  if not 0 <= warmup_steps < steps:
    raise ConfigError(f"finetune.warmup_steps={warmup_steps} must be below the {steps} steps of a run")
  if schedule == "cosine":
    fn = optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, steps, end_value=0.0)
  else:
    fn = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), optax.constant_schedule(lr)],
                              [warmup_steps])
  return np.asarray(jax.vmap(fn)(np.arange(steps)), np.float32)


@functools.lru_cache(maxsize=8)
def compiled_steps(model: ImageClassifier, task: str, mesh: jax.sharding.Mesh, lr: float,
                   weight_decay: float, augment: TrainAugment | None = None, *, optimizer: str = "adam",
                   layer_decay: float = 1.0, arch: image_registry.ImageArch | None = None):
  """(optimizer, train_step, predict_fn) of a model and its optimizer settings, built once per process:
  every run (and every equal Finetuner) reuses the compiled steps.

  `optimizer`: "adam" (torch.optim.Adam: L2 weight decay) or "adamw" (decoupled); `layer_decay` < 1
  scales the learning rate of the encoder's layer i of n by layer_decay ** (n - i) (`arch` gives the
  layers), the head's by 1."""
  size = 64  # any size the strides survive: only the parameter tree's paths are read
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, size, size, 3), np.uint8))["params"]
  lr_scales = None
  if layer_decay != 1.0:
    if arch is None:
      raise ValueError("layer_decay needs the encoder's architecture (arch)")
    layers = {path: image_registry.layer_index(arch, path)
              for path in flax.traverse_util.flatten_dict(shapes["image"])}
    top = max(count for _, count in layers.values())
    layer_of = lambda path: layers[path[1:]] if path[0] == "image" else (top, top)  # the head: all of lr
    lr_scales = optimizer_lib.layer_decay_scales(shapes, layer_of, layer_decay)
  optimizer_fn = optimizer_lib.adam(shapes, float(lr), weight_decay=float(weight_decay), lr_scales=lr_scales,
                                    decoupled_weight_decay=optimizer == "adamw")
  return (optimizer_fn, classifier_steps.make_finetune_step(model, optimizer_fn, task, mesh, augment),
          classifier_steps.make_predict_fn(model, mesh))


class Finetuner:
  """Runs fine-tuning runs that share one model, optimizer and compiled steps.

  Args:
    model: the ImageClassifier (its encoder built with axis_name=parallel.DATA_AXIS).
    config: the transfer config (finetune.*, augment, data.image_size, eval.batch_size, data threads).
    task: "binary" | "multilabel" | "multiclass".
    label_names: the data set's labels.
    sources: the data set's splits ("train", "test", and "validation" for model selection).
    mesh: the device mesh.
    identity: what else a run's results depend on (data set, encoder, architecture...), stored in every
      run's checkpoints and result and compared on resume.
    bar, logger: the job's progress bar and MetricLogger; `log_offset(run)` maps a run's step to the
      job-wide step written to the logger.
  """

  def __init__(self, model: ImageClassifier, config: ml_collections.ConfigDict, task: str,
               label_names: Sequence[str], sources: Mapping[str, Any], mesh: jax.sharding.Mesh, *,
               identity: Mapping[str, Any], bar=None, logger=None,
               log_offset: Callable[[Run], int] = lambda run: 0, preempted: preemption.SigtermFlag | None = None):
    self.model, self.config, self.task, self.mesh = model, config, task, mesh
    self.label_names = list(label_names)
    self.sources = sources
    self.identity = dict(identity)
    self.bar, self.logger, self.log_offset = bar, logger, log_offset
    self.preempted = preempted
    ft = config.finetune
    self.local_batch = parallel.local_batch_size(int(ft.batch_size), mesh)
    self.optimizer, self.train_step, self.predict_fn = compiled_steps(
        model, task, mesh, float(ft.lr), float(ft.weight_decay),
        device_augment.spec_for(config.data.augment_on, config.augment, config.data.image_size),
        optimizer=ft.optimizer, layer_decay=float(ft.layer_decay),
        arch=image_registry.arch_from_config(config.model.image) if ft.layer_decay != 1 else None)

  def settings(self, run: Run) -> dict[str, Any]:
    ft = self.config.finetune
    keep = ("lr", "weight_decay", "batch_size", "epochs", "min_steps", "max_steps", "eval_every_steps",
            "patience", "precision")
    return {**self.identity, "fraction": run.fraction, "seed": run.seed, "steps": run.steps,
            "subset_sha256": hashlib.sha256(np.asarray(run.subset, np.int64).tobytes()).hexdigest(),
            "finetune": {**{k: ft[k] for k in keep}, **recipe_options(ft)},
            "augment": self.config.augment.to_dict(),
            "task": self.task, "label_names": self.label_names}

  def run(self, run: Run, encoder: Mapping[str, Any]) -> dict[str, Any] | None:
    """Fine-tunes (or resumes, or reads the finished result of) one run; None when preempted."""
    settings = self.settings(run)
    result_path = os.path.join(run.directory, RESULT_FILE)
    if storage.exists(result_path):
      saved = storage.read_json(result_path)
      _check_settings(saved["settings"], settings, run.directory)
      return saved["result"]
    manager = checkpoints.make_manager(run.directory, keep=int(self.config.finetune.keep),
                                       best_metric=BEST_METRIC)
    try:
      result = self._train(run, encoder, settings, manager)
    finally:
      manager.close()
    if result is not None and jax.process_index() == 0:
      storage.write_json(result_path, {"settings": settings, "result": result})
    return result

  def _train(self, run: Run, encoder, settings, manager) -> dict[str, Any] | None:
    ft, mesh = self.config.finetune, self.mesh
    state = state_lib.new_state(classifier_lib.classifier_variables(self.model, encoder, run.seed),
                                self.optimizer, jax.random.PRNGKey(run.seed))
    state = parallel.replicate(state, mesh)
    # Tiled so that a subset smaller than a batch still fills every batch (repeats are harmless here).
    rows_needed = self.local_batch * jax.process_count()
    subset = np.tile(run.subset, math.ceil(rows_needed / len(run.subset)))
    train_iter = iter(pipeline.train_loader(
        features_lib.Subset(self.sources["train"], subset), None, self.config,
        local_batch_size=self.local_batch, seed=run.seed, shard_index=jax.process_index(),
        shard_count=jax.process_count()))
    stopping, step = engine.Stopping(int(ft.patience)), 0
    if manager.latest_step():  # the newest readable step; a damaged one is named and skipped
      step, state, meta = checkpoints.restore_newest(manager, checkpoints.abstract_like(state),
                                                     data_iterator=train_iter,
                                                     announce=self.bar.write if self.bar else print)
      _check_settings(meta["settings"], settings, run.directory)
      stopping = _stopping_from_tracker(int(ft.patience), meta["tracker"])
    has_validation = "validation" in self.sources
    metric_name = "accuracy" if self.task == "multiclass" else "auc"

    def validate(state):
      if not has_validation:
        return state, engine.Validation({}, None, {})
      value = self._metric(state, "validation")
      return state, engine.Validation({f"{run.prefix}/val/{metric_name}": value}, -value, {})

    rates = None
    if ft.warmup_steps or ft.schedule != "constant":
      rates = learning_rates(float(ft.lr), run.steps, int(ft.warmup_steps), ft.schedule)
    state, step, preempted = engine.train(
        state, step, self.train_step, train_iter,
        schedule=engine.Schedule(run.steps, int(ft.log_every_steps), int(ft.eval_every_steps),
                                 int(ft.eval_every_steps)),
        stopping=stopping, manager=manager, mesh=mesh,
        inputs=lambda batch: {k: batch[k] for k in ("image", "extent", "labels") if k in batch},
        validate=validate, best_metric=BEST_METRIC, host_copies=True,
        checkpoint_meta=lambda step: {"settings": settings, "tracker": _tracker(stopping), "step": step},
        prefix=f"{run.prefix}/train/", diverged=lambda metrics: (
            f"fine-tuning {run.prefix}: the training loss became {float(metrics['loss'])}; the last good "
            "checkpoint is kept. Lower config.finetune.lr, then run the same command to resume."),
        logger=self.logger, bar=self.bar, preempted=self.preempted, log_offset=self.log_offset(run),
        learning_rates=rates, tag={"run": f"{run.encoder} {run.fraction:g}/{run.seed}"})
    if preempted:
      return None
    if stopping.stopped and self.bar is not None:
      self.bar.update(run.steps - step)  # early stopped: the bar counts the planned steps
    manager.wait_until_finished()
    chosen = checkpoints.best_step(manager, BEST_METRIC) if has_validation else None
    chosen = chosen or manager.latest_step()
    if chosen != step:
      state, _ = checkpoints.restore(manager, chosen, checkpoints.abstract_like(state))
    logits, labels = self._predict(state, "test")
    test = score_predictions(logits, labels, self.label_names, self.task)
    return {"n_train": int(len(run.subset)), "n_test": int(labels.shape[0]), "steps_planned": run.steps,
            "steps_run": int(step), "stopped_early": bool(stopping.stopped), "evaluated_step": int(chosen),
            "selection": "validation" if has_validation else "last",
            "val_metric": _tracker(stopping)["best"], "test": test}

  def _predict(self, state, split: str) -> tuple[np.ndarray, np.ndarray]:
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    return features_lib.predict(self.predict_fn, variables, self.sources[split],
                                features_lib.Reading.of(self.config), self.mesh)

  def _metric(self, state, split: str) -> float | None:
    return score_predictions(*self._predict(state, split), self.label_names, self.task)["main"]


# A run's checkpoints keep the early-stopping bookkeeping as {"best": the best validation metric (higher
# is better), "best_step", "bad_evals", "stopped"}; the engine's Stopping keeps it negated (lower is better).
def _tracker(stopping: engine.Stopping) -> dict[str, Any]:
  return {"best": None if stopping.best is None else -stopping.best,
          "best_step": stopping.best_step or 0, "bad_evals": stopping.bad_evals, "stopped": stopping.stopped}


def _stopping_from_tracker(patience: int, tracker: Mapping[str, Any]) -> engine.Stopping:
  best = tracker["best"]
  return engine.Stopping(patience, best=None if best is None else -best,
                         best_step=tracker["best_step"] if best is not None else None,
                         bad_evals=int(tracker["bad_evals"]), stopped=bool(tracker["stopped"]))


def summarise(results: Mapping[tuple[float, int], Mapping[str, Any]], runs: Sequence[Run],
              label_names: Sequence[str], task: str, train_labels: np.ndarray,
              fractions: Sequence[float], seeds: Sequence[int]) -> dict[str, Any]:
  """The protocol's entry for one encoder, shaped like `linear_probe.linear_probe`'s output:
  {task, metric, label_names, n_pool, n_test, excluded_labels, fractions: [{fraction, mean, std,
  per_seed, n_train, per_label, evaluated_step, steps_run, stopped_early}]}.

  A label with a single class in a run's training subset gets None in that run (and in the fraction's
  mean), with its reason in excluded_labels.
  """
  label_names = [str(n) for n in label_names]
  positive = linear_probe.binarize_labels(train_labels, label_names, "train labels")
  excluded: dict[str, str] = {}
  by_key = {(r.fraction, r.seed): r for r in runs}
  entries = []
  n_test = None
  for fraction in fractions:
    rows = []
    for seed in seeds:
      run, result = by_key[(float(fraction), int(seed))], dict(results[(float(fraction), int(seed))])
      test = dict(result["test"])
      per_label = dict(test["per_label"])
      n_test = result.get("n_test", n_test)
      for name, reason in test.get("excluded_labels", {}).items():
        excluded.setdefault(name, reason)
      for j, name in enumerate(label_names):
        column = positive[run.subset, j]
        if column.all() or not column.any():
          excluded.setdefault(name, f"single class in the training subset (fraction {fraction:g}, "
                                    f"seed {seed})")
          per_label[name] = None
      if task != "multiclass":
        valid = [v for v in per_label.values() if v is not None]
        test["main"] = float(np.mean(valid)) if valid else None
      rows.append((result, test, per_label))
    mean, std = _mean_std([t["main"] for _, t, _ in rows])
    per_label_mean = {}
    for name in label_names:
      values = [p[name] for _, _, p in rows]
      per_label_mean[name] = None if any(v is None for v in values) else float(np.mean(values))
    entry = {"fraction": float(fraction), "mean": mean, "std": std,
             "per_seed": [t["main"] for _, t, _ in rows], "n_train": [r["n_train"] for r, _, _ in rows],
             "per_label": per_label_mean, "evaluated_step": [r["evaluated_step"] for r, _, _ in rows],
             "steps_run": [r["steps_run"] for r, _, _ in rows],
             "stopped_early": [r["stopped_early"] for r, _, _ in rows],
             "val_metric": [r["val_metric"] for r, _, _ in rows]}
    if task == "multiclass":
      macro = [t.get("auc_macro") for _, t, _ in rows]
      entry["auc_macro"] = (None if any(m is None for m in macro)
                            else dict(zip(("mean", "std"), _mean_std(macro))))
    entries.append(entry)
  return {"task": task, "metric": "accuracy" if task == "multiclass" else "auc",
          "label_names": label_names, "n_pool": int(positive.shape[0]), "n_test": n_test,
          "excluded_labels": excluded,
          "fractions": entries}


def run_all(job) -> bool:
  """The transfer job's protocol (`protocols.py`: "finetune"): every fine-tuning run of every encoder
  under one progress bar, each encoder's summary written into job.results; False when preempted."""
  config = job.config
  runs = {e.spec: make_runs(job.workdir, e.name, e.slug, job.subsets, config.finetune)
          for e in job.encoders}
  ordered = [r for e in job.encoders for r in runs[e.spec]]
  offsets, total = {}, 0
  for r in ordered:
    offsets[r.directory] = total
    total += r.steps
  done = [completed_steps(r) for r in ordered]
  resume = next((offsets[r.directory] + d for r, d in zip(ordered, done) if d < r.steps), total)
  is_main = parallel.is_main_process()
  metric_logging.announce(f"Fine-tuning: {len(ordered)} runs, {total} steps in all "
            f"({sum(done)} done), batch {config.finetune.batch_size}, lr {config.finetune.lr:g}")
  logger = metric_logging.MetricLogger(job.workdir, enabled=is_main, resume_step=resume)
  bar = metric_logging.Progress(total, sum(done), is_main, desc="fine-tune",
                                every_seconds=config.log.every_seconds,
                                batch_size=config.finetune.batch_size)
  preempted = preemption.SigtermFlag()
  try:
    finetuner = Finetuner(
        job.model, config, job.task, job.label_names, job.dataset.sources, job.mesh, identity={},
        bar=bar, logger=logger, log_offset=lambda r: offsets[r.directory], preempted=preempted)
    for encoder in job.encoders:
      finetuner.identity = job.identity(encoder)
      outcomes = {}
      for r in runs[encoder.spec]:
        outcome = finetuner.run(r, job.encoder_variables(encoder))
        if outcome is None:
          return False
        outcomes[(r.fraction, r.seed)] = outcome
      job.results["methods"][encoder.name]["finetune"] = summarise(
          outcomes, runs[encoder.spec], job.label_names, job.task, job.train_labels,
          config.fractions, config.seeds)
      job.write()
  finally:
    bar.close()
    preempted.restore()
    logger.close()
  return True
