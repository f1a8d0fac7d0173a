"""Zero-shot retrieval scored by category precision, as in the CheXpert 8x200 protocol (ConVIRT Table 2).

Candidates are images that are positive for exactly one of a few categories (8 x 200 in the paper);
a query (an image, or a text describing a category) retrieves its k nearest candidates by cosine
similarity, and Prec@k is the fraction of them in the query's category, averaged over queries. Chance
is the fraction of candidates in the query's category (1/8 for the balanced 8 x 200 set), reported
beside it so that a result reads as "x times chance".

Everything here is numpy on embeddings that are already computed; ties in similarity go to the lower
candidate index (stable sort), so results do not depend on the platform's sort.
"""
from __future__ import annotations

from collections.abc import Sequence
import os
from typing import Any

from absl import logging
import jax
import numpy as np

from convirt_jax.data.datasets import decode_record
from convirt_jax.evaluate import features as features_lib
from convirt_jax.evaluate import plots
from convirt_jax.losses import l2_normalize

EXAMPLES_PNG = "retrieval_examples.png"


def category_pure(labels: np.ndarray, categories_idx: Sequence[int], *,
                  uncertain_excludes: bool = False) -> np.ndarray:
  """Category of each row that is positive for exactly one of the given label columns, else -1.

  Args:
    labels: float [N, L]; 1 positive, 0 negative, -1 uncertain, NaN not mentioned.
    categories_idx: the label columns that define the categories; category c is column
      categories_idx[c].
    uncertain_excludes: also reject rows with an uncertain (-1) value in another category's column
      (stricter purity than "one positive").

  Returns:
    int64 [N]: position in `categories_idx` of the row's only positive column, or -1.
  """
  labels = np.asarray(labels, dtype=np.float64)
  if labels.ndim != 2:
    raise ValueError(f"labels must be [N, L], got shape {labels.shape}")
  columns = np.asarray(categories_idx, dtype=np.int64)
  if columns.ndim != 1 or columns.size == 0:
    raise ValueError(f"categories_idx must be a non-empty list of columns, got {categories_idx}")
  if columns.min() < 0 or columns.max() >= labels.shape[1] or np.unique(columns).size != columns.size:
    raise ValueError(f"categories_idx {list(columns)} must be distinct columns of the {labels.shape[1]} "
                     "label columns")
  selected = labels[:, columns]
  positive = selected == 1.0
  pure = positive.sum(axis=1) == 1
  if uncertain_excludes:
    pure &= ~(selected == -1.0).any(axis=1)
  return np.where(pure, positive.argmax(axis=1), -1).astype(np.int64)


def _normalize(embeddings: np.ndarray, name: str) -> np.ndarray:
  embeddings = np.asarray(embeddings, dtype=np.float64)
  if embeddings.ndim != 2:
    raise ValueError(f"{name} must be [N, D], got shape {embeddings.shape}")
  if not np.isfinite(embeddings).all():
    raise ValueError(f"{name}: row {np.argwhere(~np.isfinite(embeddings))[0, 0]} is not finite")
  zero = ~embeddings.any(axis=1)
  if zero.any():
    # A degenerate encoder (e.g. a baseline whose ReLUs are all off) gives zero features: they have
    # cosine similarity 0 with everything, as torch.nn.functional.normalize leaves them; no crash.
    logging.warning("%s: %d of %d rows are all zeros (similarity 0 to everything)", name,
                    int(zero.sum()), len(zero))
  return l2_normalize(embeddings)


def rank_candidates(query_emb: np.ndarray, candidate_emb: np.ndarray, k: int, *,
                    exclude_self: bool = False, chunk_size: int = 1024) -> np.ndarray:
  """int64 [Q, k]: the k candidates most cosine-similar to each query, best first.

  exclude_self: query i is candidate i (same set); it is never retrieved for itself.
  chunk_size: queries scored at a time, bounding memory to chunk_size x M similarities.
  """
  queries = _normalize(query_emb, "query_emb")
  candidates = _normalize(candidate_emb, "candidate_emb")
  if queries.shape[1] != candidates.shape[1]:
    raise ValueError(f"query and candidate dimensions differ: {queries.shape[1]} vs {candidates.shape[1]}")
  if exclude_self and queries.shape[0] != candidates.shape[0]:
    raise ValueError("exclude_self needs the queries to be the candidates (same number of rows), got "
                     f"{queries.shape[0]} queries and {candidates.shape[0]} candidates")
  available = candidates.shape[0] - int(exclude_self)
  if not 1 <= k <= available:
    raise ValueError(f"k={k} must be between 1 and the {available} candidates available per query")
  top = np.empty((queries.shape[0], k), dtype=np.int64)
  for start in range(0, queries.shape[0], chunk_size):
    similarity = queries[start:start + chunk_size] @ candidates.T
    if exclude_self:
      rows = np.arange(similarity.shape[0])
      similarity[rows, start + rows] = -np.inf
    top[start:start + chunk_size] = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
  return top


def _check_categories(category: np.ndarray, num_rows: int, name: str) -> np.ndarray:
  category = np.asarray(category)
  if category.shape != (num_rows,) or not np.issubdtype(category.dtype, np.integer):
    raise ValueError(f"{name} must be an integer array of shape ({num_rows},), got {category.dtype} "
                     f"{category.shape}")
  return category.astype(np.int64)


def precision_at_k(query_emb: np.ndarray, query_category: np.ndarray, candidate_emb: np.ndarray,
                   candidate_category: np.ndarray, ks: Sequence[int] = (5, 10, 50), *,
                   exclude_self: bool = False, category_names: Sequence[str] | None = None
                   ) -> dict[str, Any]:
  """Prec@k of cosine retrieval, overall and per query category, with the chance level.

  Args:
    query_emb, candidate_emb: [Q, D] and [M, D] embeddings (L2-normalised here).
    query_category: int [Q], each >= 0. candidate_category: int [M]; -1 marks a distractor that is
      never relevant.
    ks: cut-offs.
    exclude_self: the queries are the candidates (row i of both is the same item); an item is not
      retrieved for itself, and chance is computed over the other M - 1 candidates.
    category_names: names for the per-category entries (default: the category index as a string).

  Returns:
    {"ks": [...], "prec@k": mean over queries for each k, "chance": mean over queries of the fraction
     of (eligible) candidates in the query's category, "n_queries", "n_candidates", "exclude_self",
     "per_category": {name: {"n_queries", "prec@k"..., "chance"}}} (categories with queries only).
  """
  ks = sorted({int(k) for k in ks})
  if not ks:
    raise ValueError("ks must not be empty")
  query_category = _check_categories(query_category, np.shape(query_emb)[0], "query_category")
  candidate_category = _check_categories(candidate_category, np.shape(candidate_emb)[0],
                                         "candidate_category")
  if query_category.size == 0:
    raise ValueError("no queries")
  if (query_category < 0).any():
    raise ValueError(f"query {int(np.argmax(query_category < 0))} has category "
                     f"{query_category.min()}; queries need a category >= 0")
  if exclude_self and not np.array_equal(query_category, candidate_category):
    raise ValueError("exclude_self: query_category must equal candidate_category (the same items)")
  num_categories = int(max(query_category.max(), candidate_category.max(initial=-1))) + 1
  if category_names is not None and len(category_names) < num_categories:
    raise ValueError(f"{len(category_names)} category_names for categories 0..{num_categories - 1}")
  names = ([str(n) for n in category_names] if category_names is not None
           else [str(c) for c in range(num_categories)])
  positive = candidate_category[:, None] == np.arange(num_categories)  # a distractor (-1): none
  return precision_of_positives(query_emb, query_category, candidate_emb, positive, ks,
                                exclude_self=exclude_self, category_names=names)


def precision_of_positives(query_emb: np.ndarray, query_category: np.ndarray, candidate_emb: np.ndarray,
                           candidate_positive: np.ndarray, ks: Sequence[int], *, exclude_self: bool = False,
                           category_names: Sequence[str]) -> dict[str, Any]:
  """Prec@k where a candidate is correct when candidate_positive[candidate, query category] (a candidate
  may be positive for several categories, as in the CheXpert 8x200 set); `precision_at_k`'s result.

  With `exclude_self`, query i is candidate i: it is not retrieved for itself nor counted in chance.
  """
  ks = sorted({int(k) for k in ks})
  query_category = np.asarray(query_category, np.int64)
  positive = np.asarray(candidate_positive, bool)
  top = rank_candidates(query_emb, candidate_emb, ks[-1], exclude_self=exclude_self)
  relevant = positive[top, query_category[:, None]]                        # [Q, max k]
  hits = np.cumsum(relevant, axis=1)
  precision = {k: hits[:, k - 1] / k for k in ks}                          # per query
  same = positive[:, query_category].sum(axis=0)                           # [Q]
  if exclude_self:
    same = same - positive[np.arange(len(query_category)), query_category]
  chance = same / (positive.shape[0] - int(exclude_self))

  def summary(mask: np.ndarray) -> dict[str, float]:
    out = {f"prec@{k}": float(precision[k][mask].mean()) for k in ks}
    out["chance"] = float(chance[mask].mean())
    return out

  per_category = {}
  for c in np.unique(query_category):
    mask = query_category == c
    per_category[str(category_names[c])] = {"n_queries": int(mask.sum()), **summary(mask)}
  return {"ks": ks, **summary(np.ones(query_category.size, dtype=bool)),
          "n_queries": int(query_category.size), "n_candidates": int(positive.shape[0]),
          "exclude_self": bool(exclude_self), "per_category": per_category}


def image_to_image(image_emb: np.ndarray, image_category: np.ndarray, ks: Sequence[int] = (5, 10, 50),
                   *, query_emb: np.ndarray | None = None, query_category: np.ndarray | None = None,
                   category_names: Sequence[str] | None = None) -> dict[str, Any]:
  """Image queries against the candidate images `image_emb`.

  With `query_emb`/`query_category` (held-out query images, as the paper's expert-picked ones), those
  are the queries; without, every candidate queries all the others (itself excluded).
  """
  if (query_emb is None) != (query_category is None):
    raise ValueError("query_emb and query_category must be given together")
  if query_emb is None:
    return precision_at_k(image_emb, image_category, image_emb, image_category, ks, exclude_self=True,
                          category_names=category_names)
  return precision_at_k(query_emb, query_category, image_emb, image_category, ks,
                        category_names=category_names)


def text_to_image(text_emb: np.ndarray, text_category: np.ndarray, image_emb: np.ndarray,
                  image_category: np.ndarray, ks: Sequence[int] = (5, 10, 50), *,
                  category_names: Sequence[str] | None = None) -> dict[str, Any]:
  """Text queries (e.g. a few descriptions per category, embedded by the text encoder) against
  the image candidates (embedded by the image encoder), both in the shared projection space."""
  return precision_at_k(text_emb, text_category, image_emb, image_category, ks,
                        category_names=category_names)


def evaluate(embedder: features_lib.Embedder, dataset, tokenizer, settings, *, seed: int,
             plot_dir: str | None = None) -> dict[str, Any] | None:
  """The evaluator of `config.evals.retrieval`: Prec@k image->image (pooled features f_v) and
  text->image (projected embeddings), or None when the data set has no retrieval splits or text queries.

  (`seed` is unused: nothing is sampled.) With `plot_dir`, process 0 also writes the top text->image
  matches of each category's first query.
  """
  splits = dataset.sources
  if not ({"retrieval_candidates", "retrieval_queries"} <= set(splits) and dataset.retrieval_text_queries):
    return None
  everything = tuple(range(len(dataset.label_names)))
  candidates = embedder.split(splits["retrieval_candidates"], tokenizer, with_text=False)
  queries = embedder.split(splits["retrieval_queries"], tokenizer, with_text=False)
  candidate_category = category_pure(candidates["labels"], everything)
  query_category = category_pure(queries["labels"], everything)
  texts, text_category = [], []
  for name, category_texts in dataset.retrieval_text_queries.items():
    texts += list(category_texts)
    text_category += [dataset.label_names.index(name)] * len(category_texts)
  text_category = np.asarray(text_category)
  text_emb = embedder.texts(texts, tokenizer)["text_emb"]
  ks = tuple(settings.k)
  if plot_dir is not None and jax.process_index() == 0:
    _plot_examples(texts, text_category, text_emb, candidates["image_emb"], candidate_category,
                   splits["retrieval_candidates"], os.path.join(plot_dir, EXAMPLES_PNG))
  return {
      "image_to_image": image_to_image(
          candidates["image_features"], candidate_category, ks, query_emb=queries["image_features"],
          query_category=query_category, category_names=dataset.label_names),
      "text_to_image": text_to_image(
          text_emb, text_category, candidates["image_emb"], candidate_category, ks,
          category_names=dataset.label_names),
  }


def _plot_examples(texts, text_category, text_emb, candidate_emb, candidate_category, source, out_png,
                   top: int = 6) -> None:
  """One row per category (its first text query): the top retrieved candidates, framed by relevance."""
  first = [int(np.flatnonzero(text_category == c)[0]) for c in np.unique(text_category)]
  ranked = rank_candidates(text_emb[first], candidate_emb, top)
  images = {i: decode_record(source[i])["image"] for i in sorted(set(ranked.ravel().tolist()))}
  size = min(min(im.shape[:2]) for im in images.values())
  thumbs = np.zeros((len(source), size, size), np.uint8)
  for i, im in images.items():
    thumbs[i] = im[:size, :size]
  relevant = candidate_category[ranked] == text_category[first][:, None]
  plots.plot_retrieval_examples([texts[i] for i in first], thumbs, ranked, relevant, out_png)
