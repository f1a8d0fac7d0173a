"""Linear evaluation of frozen features: logistic regression trained on 1% / 10% / 100% of the labels.

The protocol of the ConVIRT paper (Table 1): the encoder is frozen, a linear classifier is trained on a
random fraction of the downstream training set and scored on the full test set; the reported number is
the mean (and spread) over several random subsets.

Label conventions (CheXpert style), float [N, L] with one column per finding:
  1 = positive, 0 = negative, -1 = uncertain, NaN = not mentioned.
The probe binarises them as positive = (label == 1); uncertain and not-mentioned count as negative
("U-zeros"). For task="multiclass" the labels are one-hot and every row needs exactly one positive.

Subsets: one seeded permutation of the training set per seed, and the first round(fraction * N) rows of
it (at least `min_train`), so the 1% subset of a seed is contained in its 10% subset. A random
1% of a rare finding can hold no positive at all, which makes the finding's classifier untrainable; the
subset is therefore topped up, label by label, with the next row of the permutation that has the missing
class (so n_train can exceed fraction * N by up to 2 rows per label). A label whose whole training set
has a single class is reported as null with its reason in "excluded_labels".

Regularisation: with a validation split, C is chosen per label (multilabel; by validation AUC) or once
(multiclass; by validation accuracy) from `c_grid`, ties going to the smaller C; without one, `default_c`.
Features are standardised with statistics of the training subset only.

Scores: multilabel -> per-label ROC AUC and their mean ("auc"); a label with a single class in the test
set has no AUC, is reported as null and left out of the mean. multiclass -> accuracy ("accuracy"), plus
one-vs-rest AUC per class and its macro mean ("auc_macro"). Means and sample standard deviations
(ddof=1; 0 with one seed) are over seeds. At fraction 1.0 every seed sees the same rows, so the fit is
done once and its result shared.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from convirt_jax.data import registry
from convirt_jax.errors import DataError, NothingToEvaluate
from convirt_jax.evaluate import features as features_lib
from convirt_jax.training import metric_logging

TASKS = ("multilabel", "multiclass")
DEFAULT_C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


def binarize_labels(labels: np.ndarray, label_names: Sequence[str], split: str = "labels") -> np.ndarray:
  """bool [N, L]: True where a finding is positive (== 1). Uncertain (-1) and NaN count as negative."""
  labels = np.asarray(labels, dtype=np.float64)
  if labels.ndim != 2 or labels.shape[1] != len(label_names):
    raise ValueError(f"{split}: expected shape [N, {len(label_names)}] (one column per label_names "
                     f"entry), got {labels.shape}")
  bad = ~(np.isnan(labels) | np.isin(labels, (-1.0, 0.0, 1.0)))
  if bad.any():
    row, col = np.argwhere(bad)[0]
    raise ValueError(f"{split}: label {label_names[col]!r} of row {row} is {labels[row, col]}; "
                     "expected 1, 0, -1 (uncertain) or NaN (not mentioned)")
  return labels == 1.0


def _check_features(features: np.ndarray, n_rows: int, split: str, dim: int | None = None) -> np.ndarray:
  features = np.asarray(features, dtype=np.float64)
  if features.ndim != 2 or features.shape[0] != n_rows:
    raise ValueError(f"{split}: features must be [N, D] with N = {n_rows} label rows, got {features.shape}")
  if dim is not None and features.shape[1] != dim:
    raise ValueError(f"{split}: feature dimension {features.shape[1]} != training dimension {dim}")
  if not np.isfinite(features).all():
    raise ValueError(f"{split}: row {np.argwhere(~np.isfinite(features))[0, 0]} has a non-finite feature")
  return features


def _class_indices(positive: np.ndarray, split: str) -> np.ndarray:
  """Class index per row of one-hot labels; each row must have exactly one positive."""
  counts = positive.sum(axis=1)
  if (counts != 1).any():
    row = int(np.argmax(counts != 1))
    raise ValueError(f"{split}: multiclass row {row} has {counts[row]} positive labels, expected exactly 1")
  return positive.argmax(axis=1)


def sample_training_subset(positive: np.ndarray, fraction: float, seed: int, min_train: int = 10
                           ) -> np.ndarray:
  """Sorted row indices of a seeded `fraction` of the rows, topped up so each label has both classes.

  Args:
    positive: bool [N, L] binarised labels of the whole training set.
    fraction: in (0, 1].
    seed: subsets of one seed are nested across fractions (prefixes of one permutation).
    min_train: the subset has at least this many rows (or all N).
  """
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"fraction must be in (0, 1], got {fraction}")
  num_rows = positive.shape[0]
  size = min(num_rows, max(int(min_train), int(round(fraction * num_rows))))
  order = np.random.default_rng(seed).permutation(num_rows)
  chosen = np.zeros(num_rows, dtype=bool)
  chosen[order[:size]] = True
  for column in positive.T:
    for wanted in (True, False):
      if not (column[chosen] == wanted).any():
        # The first row of the permutation outside the subset that has the missing class, if any.
        candidates = order[(column[order] == wanted) & ~chosen[order]]
        if candidates.size:
          chosen[candidates[0]] = True
  return np.flatnonzero(chosen)


def _auc_or_none(positive: np.ndarray, scores: np.ndarray) -> float | None:
  if positive.all() or not positive.any():
    return None
  return float(roc_auc_score(positive, scores))


def _sweep(x_train, y_train, x_val, x_test, c_values, max_iter, val_score, test_output):
  """Fits one model per C (ascending, each warm-started from the last) and keeps the best on validation.

  `val_score(model, x_val)` is higher for better models; with a single C no validation is done.
  Returns (C, test_output(model, x_test), model.classes_) of the chosen model.
  """
  model = LogisticRegression(C=c_values[0], solver="lbfgs", max_iter=max_iter, warm_start=True)
  best = None
  best_score = -math.inf
  for c in c_values:
    model.set_params(C=c)
    model.fit(x_train, y_train)
    score = val_score(model, x_val) if len(c_values) > 1 else 0.0
    if score > best_score:
      best_score, best = score, (c, test_output(model, x_test), model.classes_.copy())
  return best


def _fit_multilabel(x_train, pos_train, x_val, pos_val, x_test, pos_test, c_grid, default_c, max_iter):
  per_label, chosen_c = [], []
  for j in range(pos_train.shape[1]):
    y = pos_train[:, j]
    if y.all() or not y.any():
      per_label.append(None)
      chosen_c.append(None)
      continue
    can_select = pos_val is not None and pos_val[:, j].any() and not pos_val[:, j].all()
    c_values = tuple(c_grid) if can_select else (default_c,)
    val_score = lambda model, x_val, j=j: roc_auc_score(pos_val[:, j], model.decision_function(x_val))
    c, test_scores, _ = _sweep(x_train, y, x_val, x_test, c_values, max_iter, val_score,
                               lambda model, x: model.decision_function(x))
    per_label.append(_auc_or_none(pos_test[:, j], test_scores))
    chosen_c.append(c)
  valid = [a for a in per_label if a is not None]
  return {"main": float(np.mean(valid)) if valid else None, "per_label": per_label, "C": chosen_c}


def _fit_multiclass(x_train, pos_train, x_val, pos_val, x_test, pos_test, c_grid, default_c, max_iter):
  num_classes = pos_train.shape[1]
  y = pos_train.argmax(axis=1)
  c_values = tuple(c_grid) if pos_val is not None else (default_c,)
  y_val = pos_val.argmax(axis=1) if pos_val is not None else None

  def val_score(model, x_val):
    return float(np.mean(model.predict(x_val) == y_val))

  c, class_proba, classes = _sweep(x_train, y, x_val, x_test, c_values, max_iter, val_score,
                                   lambda model, x: model.predict_proba(x))
  # Probabilities over all classes; a class absent from training gets probability 0.
  proba = np.zeros((x_test.shape[0], num_classes))
  proba[:, classes] = class_proba
  accuracy = float(np.mean(proba.argmax(axis=1) == pos_test.argmax(axis=1)))
  trained = np.isin(np.arange(num_classes), classes)
  per_label = [_auc_or_none(pos_test[:, k], proba[:, k]) if trained[k] else None
               for k in range(num_classes)]
  valid = [a for a in per_label if a is not None]
  return {"main": accuracy, "per_label": per_label, "C": c,
          "auc_macro": float(np.mean(valid)) if valid else None}


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
  values = np.asarray(values, dtype=np.float64)
  std = float(values.std(ddof=1)) if values.size > 1 else 0.0
  return float(values.mean()), std


def _excluded_labels(pos_pool: np.ndarray, pos_test: np.ndarray, label_names: Sequence[str]) -> dict[str, str]:
  """Labels with a single class in the training or the test set, with the reason; NothingToEvaluate
  when that is every label."""
  excluded = {}
  for j, name in enumerate(label_names):
    if pos_pool[:, j].all() or not pos_pool[:, j].any():
      excluded[name] = "single class in the training set"
    elif pos_test[:, j].all() or not pos_test[:, j].any():
      excluded[name] = "single class in the test set"
  if len(excluded) == len(label_names):
    raise NothingToEvaluate(f"no label can be scored: {excluded}")
  return excluded


def _fit_counting_warnings(fit, *args) -> tuple[dict[str, Any], int]:
  """fit(*args) and the number of ConvergenceWarnings it raised (other warnings are re-raised)."""
  # L-BFGS-B makes many tiny BLAS calls: one thread avoids synchronisation that made fits 10-40x slower
  # on a busy machine.
  with warnings.catch_warnings(record=True) as caught, threadpool_limits(limits=1):
    warnings.simplefilter("always", ConvergenceWarning)
    result = fit(*args)
  count = 0
  for w in caught:
    if issubclass(w.category, ConvergenceWarning):
      count += 1
    else:
      warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
  return result, count


def _fraction_entry(fraction: float, runs: list[dict[str, Any]], label_names: Sequence[str],
                    task: str) -> dict[str, Any]:
  """A fraction's entry of the result from its runs (one per seed)."""
  mean, std = _mean_std([r["main"] for r in runs])
  per_label = {}
  for j, name in enumerate(label_names):
    values = [r["per_label"][j] for r in runs]
    per_label[name] = None if any(v is None for v in values) else float(np.mean(values))
  entry = {"fraction": fraction, "mean": mean, "std": std,
           "per_seed": [r["main"] for r in runs], "n_train": [r["n_train"] for r in runs],
           "per_label": per_label, "C": [r["C"] for r in runs]}
  if task == "multiclass":
    macro = [r["auc_macro"] for r in runs]
    entry["auc_macro"] = (None if any(m is None for m in macro)
                          else dict(zip(("mean", "std"), _mean_std(macro))))
  return entry


def linear_probe(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                 test_labels: np.ndarray, *, label_names: Sequence[str], task: str,
                 fractions: Sequence[float] = (0.01, 0.1, 1.0), seeds: Sequence[int] = (0, 1, 2),
                 val_features: np.ndarray | None = None, val_labels: np.ndarray | None = None,
                 c_grid: Sequence[float] = DEFAULT_C_GRID, default_c: float = 1.0,
                 max_iter: int = 1000, min_train: int = 10) -> dict[str, Any]:
  """Trains logistic-regression probes on label fractions of the training set; scores them on test.

  Returns a JSON-ready dict:
    task, metric ("auc" | "accuracy"), label_names, n_pool, n_test, c_selection ("validation" | "fixed"),
    excluded_labels {name: reason} (labels with no score at all), convergence_warnings (count),
    fractions: one entry per fraction, in the given order:
      {fraction, mean, std, per_seed [main metric per seed], n_train [per seed],
       per_label {name: mean over seeds or None}, C [per seed: per-label list (multilabel) or float],
       auc_macro {mean, std} (multiclass only)}
  """
  if task not in TASKS:
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")
  label_names = [str(n) for n in label_names]
  if (val_features is None) != (val_labels is None):
    raise ValueError("val_features and val_labels must be given together")
  if not seeds:
    raise ValueError("seeds must not be empty")
  if not c_grid or min(c_grid) <= 0 or default_c <= 0:
    raise ValueError(f"C values must be positive, got c_grid={c_grid}, default_c={default_c}")
  c_grid = tuple(sorted(float(c) for c in c_grid))

  pos_pool = binarize_labels(train_labels, label_names, "train_labels")
  pos_test = binarize_labels(test_labels, label_names, "test_labels")
  x_pool = _check_features(train_features, pos_pool.shape[0], "train_features")
  x_test_raw = _check_features(test_features, pos_test.shape[0], "test_features", x_pool.shape[1])
  pos_val = x_val_raw = None
  if val_labels is not None:
    pos_val = binarize_labels(val_labels, label_names, "val_labels")
    x_val_raw = _check_features(val_features, pos_val.shape[0], "val_features", x_pool.shape[1])
  if task == "multiclass":
    for split, pos in (("train_labels", pos_pool), ("test_labels", pos_test), ("val_labels", pos_val)):
      if pos is not None:
        _class_indices(pos, split)
    if np.count_nonzero(pos_pool.any(axis=0)) < 2:
      raise NothingToEvaluate("train_labels: multiclass probing needs at least two classes in the "
                              "training set")
  fit = _fit_multilabel if task == "multilabel" else _fit_multiclass

  excluded = _excluded_labels(pos_pool, pos_test, label_names)

  cache: dict[bytes, dict] = {}
  num_warnings = 0
  entries = []
  for fraction in fractions:
    runs = []
    for seed in seeds:
      subset = sample_training_subset(pos_pool, float(fraction), int(seed), min_train)
      key = subset.tobytes()
      if key not in cache:
        scaler = StandardScaler().fit(x_pool[subset])
        x_val = scaler.transform(x_val_raw) if x_val_raw is not None else None
        result, warned = _fit_counting_warnings(
            fit, scaler.transform(x_pool[subset]), pos_pool[subset], x_val, pos_val,
            scaler.transform(x_test_raw), pos_test, c_grid, default_c, max_iter)
        num_warnings += warned
        result["n_train"] = int(subset.size)
        cache[key] = result
      runs.append(cache[key])
    entries.append(_fraction_entry(float(fraction), runs, label_names, task))

  return {"task": task, "metric": "auc" if task == "multilabel" else "accuracy",
          "label_names": label_names, "n_pool": int(pos_pool.shape[0]), "n_test": int(pos_test.shape[0]),
          "c_selection": "validation" if pos_val is not None else "fixed",
          "excluded_labels": excluded, "convergence_warnings": num_warnings, "fractions": entries}


def run(job, encoder) -> dict[str, Any]:
  """The transfer job's linear protocol (`protocols.py`: "linear"): `linear_probe` on the frozen
  encoder's pooled features, on the job's training subsets.

  The paper trains a linear layer with Adam on frozen features; this is the same model (a linear
  classifier with a logistic loss) fitted to its optimum by L-BFGS, with the L2 strength chosen on
  validation. The problem is convex, so both reach the same family of optima; L-BFGS does so
  deterministically, without a learning rate or epoch count to tune, and in seconds on a CPU. It is the
  one implementation the pretraining job's evaluation uses too.
  """
  config = job.config
  settings = {**job.identity(encoder), "linear": config.linear.to_dict()}

  def compute():
    metric_logging.announce(f"Linear protocol: {encoder.name}...")
    sources = {s: v for s, v in job.dataset.sources.items() if s in ("train", "validation", "test")}
    splits = features_lib.pooled_features(job.model, job.encoder_variables(encoder), sources,
                                          features_lib.Reading.of(config), job.mesh)
    val, linear = splits.get("validation"), config.linear
    try:
      result = linear_probe(
          splits["train"][0], splits["train"][1], splits["test"][0], splits["test"][1],
          label_names=job.label_names, task="multiclass" if job.task == "multiclass" else "multilabel",
          fractions=tuple(config.fractions), seeds=tuple(config.seeds),
          val_features=None if val is None else val[0], val_labels=None if val is None else val[1],
          c_grid=tuple(linear.c_grid), default_c=linear.default_c, max_iter=linear.max_iter,
          min_train=config.min_train)
    except ValueError as e:
      raise DataError(f"linear protocol on {encoder.name}: {e}") from e
    return dict(result, task=job.task)
  return job.cached("linear", encoder, settings, compute)


def evaluate(embedder: features_lib.Embedder, dataset, tokenizer, settings, *, seed: int,
             plot_dir: str | None = None) -> dict[str, Any] | None:
  """The evaluator of `config.evals.linear_probe`: {dataset title: `linear_probe(...)` output} on the
  frozen encoder's pooled features, or None when the data set has no labels or no train/test split.
  (It draws no plot: `plot_dir` is unused.)"""
  splits = dataset.sources
  if not dataset.label_names or "train" not in splits or "test" not in splits:
    return None
  train_source = features_lib.capped(splits["train"], settings.max_train_examples, seed)
  embed = lambda source: embedder.split(source, tokenizer, with_text=False)
  train, test = embed(train_source), embed(splits["test"])
  val = embed(splits["validation"]) if "validation" in splits else None
  title = registry.title(dataset.name)
  return {title: linear_probe(
      train["image_features"], train["labels"], test["image_features"], test["labels"],
      label_names=dataset.label_names, task=dataset.task, fractions=tuple(settings.fractions),
      seeds=tuple(settings.seeds), val_features=None if val is None else val["image_features"],
      val_labels=None if val is None else val["labels"], c_grid=tuple(settings.c_grid),
      default_c=settings.default_c, max_iter=settings.max_iter, min_train=settings.min_train)}
