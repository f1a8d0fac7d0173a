"""Retrieval Prec@k: against a brute-force double loop, hand-made cases, ties, self-exclusion."""
import math

import numpy as np
import pytest

from convirt_jax.evaluate import retrieval as rt


def _brute_force(queries, query_category, candidates, candidate_category, ks, exclude_self):
  """Per-query Prec@k and chance with plain Python loops (no shared code with the module)."""
  precision, chance = {k: [] for k in ks}, []
  for i, q in enumerate(queries):
    scored = []
    for j, c in enumerate(candidates):
      if exclude_self and i == j:
        continue
      cosine = sum(a * b for a, b in zip(q, c)) / (math.sqrt(sum(a * a for a in q)) *
                                                   math.sqrt(sum(b * b for b in c)))
      scored.append((-cosine, j))
    scored.sort()
    for k in ks:
      precision[k].append(sum(candidate_category[j] == query_category[i] for _, j in scored[:k]) / k)
    chance.append(sum(candidate_category[j] == query_category[i] for _, j in scored) / len(scored))
  return precision, chance


@pytest.mark.parametrize("exclude_self", [False, True])
def test_matches_brute_force(exclude_self):
  rng = np.random.default_rng(0)
  candidates = rng.normal(size=(120, 8)) + 0.5
  candidate_category = rng.integers(-1, 5, 120)  # -1: distractors that are never relevant
  if exclude_self:
    candidate_category = np.abs(candidate_category)
    queries, query_category = candidates, candidate_category
  else:
    queries, query_category = rng.normal(size=(25, 8)) + 0.5, rng.integers(0, 5, 25)
  ks = (1, 5, 10, 50)
  result = rt.precision_at_k(queries, query_category, candidates, candidate_category, ks,
                             exclude_self=exclude_self, category_names=list("ABCDE"))
  precision, chance = _brute_force(queries.tolist(), query_category.tolist(), candidates.tolist(),
                                   candidate_category.tolist(), ks, exclude_self)
  for k in ks:
    assert abs(result[f"prec@{k}"] - np.mean(precision[k])) < 1e-12
  assert abs(result["chance"] - np.mean(chance)) < 1e-12
  for c, name in enumerate("ABCDE"):
    mask = query_category == c
    entry = result["per_category"][name]
    assert entry["n_queries"] == mask.sum()
    for k in ks:
      assert abs(entry[f"prec@{k}"] - np.mean(np.array(precision[k])[mask])) < 1e-12
    assert abs(entry["chance"] - np.mean(np.array(chance)[mask])) < 1e-12
  assert result["n_queries"] == len(queries) and result["n_candidates"] == 120


def test_hand_made_ranking():
  query = np.array([[1.0, 0.0]])
  # cosines to the query: 0.995, 0.0, 0.981, -1.0 -> order 0, 2, 1, 3
  candidates = np.array([[1.0, 0.1], [0.0, 1.0], [1.0, -0.2], [-3.0, 0.0]])
  category = np.array([0, 1, 1, 0])
  np.testing.assert_array_equal(rt.rank_candidates(query, candidates, 4), [[0, 2, 1, 3]])
  result = rt.precision_at_k(query, np.array([0]), candidates, category, ks=(1, 2, 3, 4))
  assert [result[f"prec@{k}"] for k in (1, 2, 3, 4)] == [1.0, 0.5, pytest.approx(1 / 3), 0.5]
  assert result["chance"] == 0.5
  assert result["ks"] == [1, 2, 3, 4]


def test_ties_go_to_the_lower_index():
  candidates = np.array([[0.0, 1.0], [2.0, 0.0], [1.0, 0.0], [5.0, 0.0], [0.0, 3.0]])
  np.testing.assert_array_equal(rt.rank_candidates(np.array([[1.0, 0.0]]), candidates, 5),
                                [[1, 2, 3, 0, 4]])
  # Long runs of exact ties (unstable sorts reorder these beyond ~16 elements).
  rng = np.random.default_rng(4)
  candidates = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])[rng.integers(0, 3, 300)]
  similarity = candidates[:, 0] / np.linalg.norm(candidates, axis=1)
  expected = np.lexsort((np.arange(300), -similarity))
  np.testing.assert_array_equal(rt.rank_candidates(np.array([[1.0, 0.0]]), candidates, 300)[0], expected)


def test_perfect_embeddings_give_one():
  rng = np.random.default_rng(1)
  category = np.repeat(np.arange(8), 60)
  embeddings = np.eye(8)[category] + 0.01 * rng.normal(size=(480, 8))
  result = rt.image_to_image(embeddings, category, ks=(5, 10, 50))
  assert [result[f"prec@{k}"] for k in (5, 10, 50)] == [1.0, 1.0, 1.0]
  assert result["chance"] == pytest.approx(59 / 479, abs=1e-15)
  texts = rt.text_to_image(np.eye(8), np.arange(8), embeddings, category, ks=(5, 60))
  assert texts["prec@60"] == 1.0 and texts["chance"] == 1 / 8
  held_out = rt.image_to_image(embeddings, category, ks=(60,), query_emb=2 * np.eye(8)[[3, 5]],
                               query_category=np.array([3, 5]))
  assert held_out["prec@60"] == 1.0 and held_out["n_queries"] == 2 and not held_out["exclude_self"]


def test_self_exclusion():
  rng = np.random.default_rng(2)
  embeddings = rng.normal(size=(50, 6))
  with_self = rt.rank_candidates(embeddings, embeddings, 3)
  without_self = rt.rank_candidates(embeddings, embeddings, 3, exclude_self=True)
  np.testing.assert_array_equal(with_self[:, 0], np.arange(50))
  assert not (without_self == np.arange(50)[:, None]).any()
  np.testing.assert_array_equal(without_self[:, :2], with_self[:, 1:])
  with pytest.raises(ValueError, match="same number of rows"):
    rt.rank_candidates(embeddings[:10], embeddings, 3, exclude_self=True)
  with pytest.raises(ValueError, match="k=50 must be between 1 and the 49"):
    rt.rank_candidates(embeddings, embeddings, 50, exclude_self=True)


def test_chunks_do_not_change_the_ranking():
  rng = np.random.default_rng(3)
  queries, candidates = rng.normal(size=(37, 5)), rng.normal(size=(90, 5))
  np.testing.assert_array_equal(rt.rank_candidates(queries, candidates, 10, chunk_size=4),
                                rt.rank_candidates(queries, candidates, 10))
  np.testing.assert_array_equal(
      rt.rank_candidates(candidates, candidates, 10, exclude_self=True, chunk_size=7),
      rt.rank_candidates(candidates, candidates, 10, exclude_self=True))


def test_category_pure():
  nan = np.nan
  labels = np.array([[1, 0, nan, 0],
                     [1, 1, 0, 0],
                     [0, -1, 1, 1],
                     [nan, nan, nan, 1],
                     [0, 1, -1, 0],
                     [-1, -1, -1, -1]])
  np.testing.assert_array_equal(rt.category_pure(labels, [0, 1, 2]), [0, -1, 2, -1, 1, -1])
  np.testing.assert_array_equal(rt.category_pure(labels, [0, 1, 2], uncertain_excludes=True),
                                [0, -1, -1, -1, -1, -1])
  np.testing.assert_array_equal(rt.category_pure(labels, [3, 0]), [1, 1, 0, 0, -1, -1])
  with pytest.raises(ValueError, match="distinct columns"):
    rt.category_pure(labels, [0, 4])


def test_bad_inputs_name_the_problem():
  embeddings = np.ones((4, 3))
  embeddings[2] = 0  # a zero row has similarity 0 to everything: ranked last, not an error
  np.testing.assert_array_equal(rt.rank_candidates(np.ones((1, 3)), embeddings, 4), [[0, 1, 3, 2]])
  with pytest.raises(ValueError, match="query 1 has category -1"):
    rt.precision_at_k(np.ones((2, 3)), np.array([0, -1]), np.ones((4, 3)), np.zeros(4, int), ks=(1,))
  with pytest.raises(ValueError, match="query_category must be an integer array"):
    rt.precision_at_k(np.ones((2, 3)), np.array([0.0, 1.0]), np.ones((4, 3)), np.zeros(4, int))
  with pytest.raises(ValueError, match="dimensions differ"):
    rt.precision_at_k(np.ones((2, 2)), np.array([0, 1]), np.ones((4, 3)), np.zeros(4, int), ks=(1,))
