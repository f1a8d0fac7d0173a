"""The paper's evaluations of a pretrained image encoder, for ConVIRT and its baselines.

- Linear probe (Table 1): the frozen image encoder's pooled features f_v of the train / validation / test
  splits, logistic regression on 1% / 10% / 100% of the training labels (`linear_probe.py`).
- Retrieval (Table 2, the CheXpert 8x200 protocol) when the data set has retrieval splits:
  image->image ranks category-pure candidates by the cosine similarity of encoder features f_v to each
  query image's; text->image ranks them by the similarity of projected image and text embeddings to each
  category's text queries. Prec@k counts candidates of the query's category.

Writes results.json / results.md, the probe curve and a grid of text->image retrieval examples.
"""
from __future__ import annotations

import os
from typing import Any

from absl import logging
import jax
import numpy as np

from convirt_jax.data.datasets import Dataset, decode_record
from convirt_jax.evaluate import features as features_lib
from convirt_jax.evaluate import linear_probe, report, retrieval

DATASET_TITLES = {"synthetic": "Synthetic CXR", "mimic_cxr": "MIMIC-CXR", "csv": "CSV labels"}
RETRIEVAL_EXAMPLES_PNG = "retrieval_examples.png"
PROBE_CURVES_PNG = "probe_curves.png"


def evaluate_method(embedder: features_lib.Embedder, dataset: Dataset, tokenizer, config):
  """({"linear_probe": {dataset title: ...}, "retrieval": {direction: ...}}, retrieval examples or None)."""
  result: dict[str, Any] = {}
  examples = None
  splits = dataset.sources
  if dataset.label_names and "train" in splits and "test" in splits:
    probe_cfg = config.eval.linear_probe
    train_source = features_lib.capped(splits["train"], probe_cfg.max_train_examples, config.train.seed)
    embed = lambda source: embedder.split(source, tokenizer, config, with_text=False)
    train, test = embed(train_source), embed(splits["test"])
    val = embed(splits["validation"]) if "validation" in splits else None
    result["linear_probe"] = {DATASET_TITLES[config.data.name]: linear_probe.linear_probe(
        train["image_features"], train["labels"], test["image_features"], test["labels"],
        label_names=dataset.label_names, task=dataset.task, fractions=tuple(probe_cfg.fractions),
        seeds=tuple(probe_cfg.seeds), val_features=None if val is None else val["image_features"],
        val_labels=None if val is None else val["labels"], c_grid=tuple(probe_cfg.c_grid),
        default_c=probe_cfg.default_c, max_iter=probe_cfg.max_iter, min_train=probe_cfg.min_train)}
  if {"retrieval_candidates", "retrieval_queries"} <= set(splits) and dataset.retrieval_text_queries:
    result["retrieval"], examples = retrieval_results(embedder, dataset, tokenizer, config)
  return result, examples


def retrieval_results(embedder, dataset: Dataset, tokenizer, config):
  """Prec@k both ways, and what the example grid needs (text queries and their rankings)."""
  everything = tuple(range(len(dataset.label_names)))
  candidates = embedder.split(dataset.sources["retrieval_candidates"], tokenizer, config, with_text=False)
  queries = embedder.split(dataset.sources["retrieval_queries"], tokenizer, config, with_text=False)
  candidate_category = retrieval.category_pure(candidates["labels"], everything)
  query_category = retrieval.category_pure(queries["labels"], everything)
  texts, text_category = [], []
  for name, category_texts in dataset.retrieval_text_queries.items():
    texts += list(category_texts)
    text_category += [dataset.label_names.index(name)] * len(category_texts)
  text_emb = embedder.texts(texts, tokenizer, config)["text_emb"]
  ks = tuple(config.eval.retrieval.k)
  results = {
      "image_to_image": retrieval.image_to_image(
          candidates["image_features"], candidate_category, ks, query_emb=queries["image_features"],
          query_category=query_category, category_names=dataset.label_names),
      "text_to_image": retrieval.text_to_image(
          text_emb, np.asarray(text_category), candidates["image_emb"], candidate_category, ks,
          category_names=dataset.label_names),
  }
  examples = {"texts": texts, "text_category": np.asarray(text_category), "text_emb": text_emb,
              "candidate_emb": candidates["image_emb"], "candidate_category": candidate_category}
  return results, examples


def plot_retrieval_examples(ex: dict[str, Any], dataset: Dataset, out_png: str, top: int = 6) -> None:
  """One row per category (its first text query): the top retrieved candidates, framed by relevance."""
  first = [int(np.flatnonzero(ex["text_category"] == c)[0]) for c in np.unique(ex["text_category"])]
  ranked = retrieval.rank_candidates(ex["text_emb"][first], ex["candidate_emb"], top)
  source = dataset.sources["retrieval_candidates"]
  needed = sorted(set(ranked.ravel().tolist()))
  images = {i: decode_record(source[i])["image"] for i in needed}
  size = min(min(im.shape[:2]) for im in images.values())
  thumbs = np.zeros((len(source), size, size), np.uint8)
  for i, im in images.items():
    thumbs[i] = im[:size, :size] if im.ndim == 2 else im[:size, :size, 0]
  relevant = ex["candidate_category"][ranked] == ex["text_category"][first][:, None]
  report.plot_retrieval_examples([ex["texts"][i] for i in first], thumbs, ranked, relevant, out_png)


def run_downstream(config, workdir: str, model, weights: dict[str, dict[str, Any]], dataset: Dataset,
                   tokenizer, mesh, run_info: dict[str, Any]) -> dict[str, Any]:
  """Evaluates every {method name: variables} and writes the results files (process 0 writes)."""
  results = {"run": run_info, "methods": {}}
  examples = {}
  for name, variables in weights.items():
    logging.info("Evaluating %s", name)
    embedder = features_lib.Embedder(model, variables, mesh)
    results["methods"][name], examples[name] = evaluate_method(embedder, dataset, tokenizer, config)
  if jax.process_index() == 0:
    report.write_results(workdir, results)
    if any("linear_probe" in m for m in results["methods"].values()):
      report.plot_probe_curves(results, os.path.join(workdir, PROBE_CURVES_PNG))
    if examples.get("ConVIRT") is not None:
      plot_retrieval_examples(examples["ConVIRT"], dataset, os.path.join(workdir, RETRIEVAL_EXAMPLES_PNG))
  return results
