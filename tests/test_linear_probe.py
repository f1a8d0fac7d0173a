"""Linear probe: accuracy against Bayes-optimal scores, subset sampling, exclusions, determinism."""
import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from convirt_jax.evaluate import linear_probe as lp

NAMES = ["a", "b", "c"]


def _linear_labels(rng, num_rows, weights, mask_fraction=0.1):
  """Features ~ N(0, I); finding j is positive when x . w_j + noise > 1; some entries are then replaced
  by uncertain (-1) or not mentioned (NaN) independently of x, which keeps P(positive | x) monotone in
  x . w_j, so x . w_j is a Bayes-optimal score for the observed labels."""
  x = rng.normal(size=(num_rows, weights.shape[0]))
  labels = (x @ weights + rng.normal(size=(num_rows, weights.shape[1])) > 1.0).astype(np.float32)
  masked = rng.random(labels.shape) < mask_fraction
  labels[masked] = np.where(rng.random(masked.sum()) < 0.5, -1.0, np.nan)
  return x, labels


@pytest.fixture(scope="module")
def linear_data():
  rng = np.random.default_rng(0)
  weights = rng.normal(size=(32, len(NAMES))) * 0.5
  return weights, [_linear_labels(rng, n, weights) for n in (3000, 500, 2000)]  # train, val, test


def test_binarize_is_u_zeros_and_rejects_unknown_values():
  labels = np.array([[1, 0, -1], [np.nan, 1, 1]])
  np.testing.assert_array_equal(lp.binarize_labels(labels, NAMES),
                                [[True, False, False], [False, True, True]])
  with pytest.raises(ValueError, match=r"label 'b' of row 1 is 2\.0"):
    lp.binarize_labels(np.array([[1, 0, 0], [0, 2, 0]]), NAMES)
  with pytest.raises(ValueError, match="one column per label_names"):
    lp.binarize_labels(np.zeros((2, 2)), NAMES)


def test_auc_near_bayes_optimal_and_increases_with_fraction(linear_data):
  weights, ((x_train, y_train), (x_val, y_val), (x_test, y_test)) = linear_data
  result = lp.linear_probe(x_train, y_train, x_test, y_test, label_names=NAMES, task="multilabel",
                           val_features=x_val, val_labels=y_val)
  positive_test = lp.binarize_labels(y_test, NAMES)
  bayes = {n: roc_auc_score(positive_test[:, j], x_test @ weights[:, j]) for j, n in enumerate(NAMES)}
  full = result["fractions"][-1]
  assert full["fraction"] == 1.0 and full["n_train"] == [3000] * 3
  for name in NAMES:
    # Measured: 0.002-0.004 below the Bayes score; it cannot do much better on the same test set.
    assert bayes[name] - 0.01 < full["per_label"][name] < bayes[name] + 0.002, name
  assert abs(full["mean"] - np.mean(list(bayes.values()))) < 0.01
  means = [f["mean"] for f in result["fractions"]]
  assert means[0] + 0.02 < means[1] < means[2], means  # 1% < 10% < 100%
  assert full["std"] == 0.0  # every seed trains on the whole set
  assert all(f["C"][0][j] in lp.DEFAULT_C_GRID for f in result["fractions"] for j in range(3))
  assert result["c_selection"] == "validation" and result["excluded_labels"] == {}


def test_full_fraction_matches_a_direct_sklearn_fit(linear_data):
  _, ((x_train, y_train), _, (x_test, y_test)) = linear_data
  result = lp.linear_probe(x_train, y_train, x_test, y_test, label_names=NAMES, task="multilabel",
                           fractions=(1.0,), seeds=(0,), default_c=0.3)
  scaler = StandardScaler().fit(x_train)
  pos_train, pos_test = lp.binarize_labels(y_train, NAMES), lp.binarize_labels(y_test, NAMES)
  for j, name in enumerate(NAMES):
    model = LogisticRegression(C=0.3, max_iter=1000).fit(scaler.transform(x_train), pos_train[:, j])
    expected = roc_auc_score(pos_test[:, j], model.decision_function(scaler.transform(x_test)))
    assert abs(result["fractions"][0]["per_label"][name] - expected) < 1e-9


def test_single_value_grid_equals_fixed_c(linear_data):
  _, ((x_train, y_train), (x_val, y_val), (x_test, y_test)) = linear_data
  kwargs = dict(label_names=NAMES, task="multilabel", fractions=(0.1,), seeds=(1,))
  fixed = lp.linear_probe(x_train, y_train, x_test, y_test, default_c=0.05, **kwargs)
  selected = lp.linear_probe(x_train, y_train, x_test, y_test, val_features=x_val, val_labels=y_val,
                             c_grid=(0.05,), **kwargs)
  for name in NAMES:
    assert abs(fixed["fractions"][0]["per_label"][name] - selected["fractions"][0]["per_label"][name]) < 1e-12


def test_random_features_give_chance_auc():
  rng = np.random.default_rng(1)
  x_train, x_test = rng.normal(size=(2000, 32)), rng.normal(size=(2000, 32))
  y_train = (rng.random((2000, 3)) < 0.3).astype(np.float32)
  y_test = (rng.random((2000, 3)) < 0.3).astype(np.float32)
  result = lp.linear_probe(x_train, y_train, x_test, y_test, label_names=NAMES, task="multilabel")
  for row in result["fractions"]:
    assert abs(row["mean"] - 0.5) < 0.03, row  # measured |AUC - 0.5| <= 0.015


def test_subsets_hold_both_classes_and_minimum_size():
  rng = np.random.default_rng(2)
  positive = rng.random((2000, 3)) < 0.3
  positive[:, 1] = False
  positive[rng.choice(2000, 4, replace=False), 1] = True  # 4 positives in 2000: 1% rarely holds one
  positive[:, 2] = True
  positive[7, 2] = False  # and a single negative
  for seed in range(20):
    small = lp.sample_training_subset(positive, 0.01, seed)
    assert 20 <= small.size <= 20 + 2 * 3
    assert positive[small].any(axis=0).all() and (~positive[small]).any(axis=0).all(), seed
    assert np.array_equal(small, np.unique(small))
    assert np.isin(small, lp.sample_training_subset(positive, 0.1, seed)).all()  # nested
  assert lp.sample_training_subset(positive, 0.001, 0, min_train=10).size >= 10
  assert lp.sample_training_subset(positive, 1.0, 3).size == 2000
  with pytest.raises(ValueError, match="fraction"):
    lp.sample_training_subset(positive, 0.0, 0)


def test_label_with_one_class_is_excluded_from_the_mean(linear_data):
  _, ((x_train, y_train), _, (x_test, y_test)) = linear_data
  y_train, y_test = y_train.copy(), y_test.copy()
  y_test[:, 1] = np.where(np.isnan(y_test[:, 1]), np.nan, 0.0)  # no positive in test
  y_train[:, 2] = 0.0  # no positive in the whole training set
  result = lp.linear_probe(x_train, y_train, x_test, y_test, label_names=NAMES, task="multilabel",
                           fractions=(0.1, 1.0), seeds=(0, 1))
  assert result["excluded_labels"] == {"b": "single class in the test set",
                                       "c": "single class in the training set"}
  for row in result["fractions"]:
    assert row["per_label"]["b"] is None and row["per_label"]["c"] is None
    assert row["mean"] == pytest.approx(row["per_label"]["a"], abs=1e-12)
  y_test[:, 0] = 1.0
  with pytest.raises(ValueError, match="no label can be scored"):
    lp.linear_probe(x_train, y_train, x_test, y_test, label_names=NAMES, task="multilabel")


def test_deterministic_by_seed(linear_data):
  _, ((x_train, y_train), _, (x_test, y_test)) = linear_data
  kwargs = dict(label_names=NAMES, task="multilabel", fractions=(0.01, 0.1))
  first = lp.linear_probe(x_train, y_train, x_test, y_test, seeds=(0, 1), **kwargs)
  again = lp.linear_probe(x_train, y_train, x_test, y_test, seeds=(0, 1), **kwargs)
  other = lp.linear_probe(x_train, y_train, x_test, y_test, seeds=(5, 6), **kwargs)
  assert first == again
  assert first["fractions"][0]["per_seed"][0] != first["fractions"][0]["per_seed"][1]
  assert first["fractions"][0]["per_seed"] != other["fractions"][0]["per_seed"]


def test_multiclass_accuracy_near_bayes():
  rng = np.random.default_rng(3)
  means = rng.normal(size=(3, 16)) * 0.6

  def sample(num_rows):
    y = rng.integers(0, 3, num_rows)
    return means[y] + rng.normal(size=(num_rows, 16)), np.eye(3, dtype=np.float32)[y]

  (x_train, y_train), (x_val, y_val), (x_test, y_test) = sample(3000), sample(500), sample(3000)
  result = lp.linear_probe(x_train, y_train, x_test, y_test, label_names=["x", "y", "z"],
                           task="multiclass", val_features=x_val, val_labels=y_val)
  # Equal priors, identity covariance: the Bayes rule is the nearest class mean.
  bayes = np.mean(np.argmin(((x_test[:, None] - means[None]) ** 2).sum(-1), 1) == y_test.argmax(1))
  full = result["fractions"][-1]
  assert result["metric"] == "accuracy"
  assert bayes - 0.02 < full["mean"] < bayes + 0.01, (full["mean"], bayes)  # measured: 0.002 above, by chance
  assert result["fractions"][0]["mean"] < full["mean"]
  assert 0.5 < full["auc_macro"]["mean"] <= 1.0
  assert set(full["per_label"]) == {"x", "y", "z"}
  y_bad = y_train.copy()
  y_bad[5] = [1, 1, 0]
  with pytest.raises(ValueError, match="train_labels: multiclass row 5 has 2 positive"):
    lp.linear_probe(x_train, y_bad, x_test, y_test, label_names=["x", "y", "z"], task="multiclass")


def test_convergence_warnings_are_counted_not_emitted(linear_data):
  _, ((x_train, y_train), _, (x_test, y_test)) = linear_data
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    result = lp.linear_probe(x_train, y_train, x_test, y_test, label_names=NAMES, task="multilabel",
                             fractions=(1.0,), seeds=(0,), max_iter=2)
  assert result["convergence_warnings"] == 3
  assert not [w for w in caught if issubclass(w.category, ConvergenceWarning)]


def test_bad_inputs_name_the_problem(linear_data):
  _, ((x_train, y_train), _, (x_test, y_test)) = linear_data
  kwargs = dict(label_names=NAMES, task="multilabel")
  with pytest.raises(ValueError, match="task must be one of"):
    lp.linear_probe(x_train, y_train, x_test, y_test, label_names=NAMES, task="binary")
  with pytest.raises(ValueError, match="train_features: features must be"):
    lp.linear_probe(x_train[:10], y_train, x_test, y_test, **kwargs)
  with pytest.raises(ValueError, match="test_features: feature dimension 31"):
    lp.linear_probe(x_train, y_train, x_test[:, 1:], y_test, **kwargs)
  x_nan = x_test.copy()
  x_nan[17, 3] = np.nan
  with pytest.raises(ValueError, match="test_features: row 17"):
    lp.linear_probe(x_train, y_train, x_nan, y_test, **kwargs)
  with pytest.raises(ValueError, match="given together"):
    lp.linear_probe(x_train, y_train, x_test, y_test, val_features=x_test, **kwargs)


def test_two_class_one_hot_matches_a_direct_sklearn_fit():
  rng = np.random.default_rng(4)
  y_train, y_test = rng.integers(0, 2, 800), rng.integers(0, 2, 800)
  x_train = rng.normal(size=(800, 8)) + y_train[:, None] * 0.4
  x_test = rng.normal(size=(800, 8)) + y_test[:, None] * 0.4
  result = lp.linear_probe(x_train, np.eye(2)[y_train], x_test, np.eye(2)[y_test], label_names=["no", "yes"],
                           task="multiclass", fractions=(1.0,), seeds=(0,))
  scaler = StandardScaler().fit(x_train)
  model = LogisticRegression(C=1.0, max_iter=1000).fit(scaler.transform(x_train), y_train)
  proba = model.predict_proba(scaler.transform(x_test))[:, 1]
  row = result["fractions"][0]
  assert row["mean"] == pytest.approx(np.mean((proba > 0.5) == y_test), abs=1e-12)
  assert row["auc_macro"]["mean"] == pytest.approx(roc_auc_score(y_test, proba), abs=1e-9)
