"""Runs the evaluators named in `config.evals` for several encoders and writes the results files.

Each key of `config.evals` names a pretraining protocol of `protocols.py`, whose module has one entry
function `evaluate(embedder, dataset, tokenizer, settings, *, seed, plot_dir)` that returns a JSON-ready
result (or None when the data set does not support it); it is given its own settings
(`config.evals.<name>`), never the whole config. A new evaluation is its module, one registration line
and its config entry:

  linear_probe  the paper's linear classification (Table 1 protocol) on the frozen pooled features
  retrieval     Prec@k image->image and text->image (the CheXpert 8x200 protocol of Table 2)

Writes results.json / results.md and the probe curve; the first method (ConVIRT) also gets the
evaluators' example plots.
"""
from __future__ import annotations

import os
from typing import Any

from absl import logging
import jax

from convirt_jax.data.datasets import Dataset
from convirt_jax.errors import NothingToEvaluate
from convirt_jax.evaluate import features as features_lib
from convirt_jax.evaluate import plots, protocols, results as results_lib

PROBE_CURVES_PNG = "probe_curves.png"


def evaluate_method(embedder: features_lib.Embedder, dataset: Dataset, tokenizer, evals, *, seed: int,
                    plot_dir: str | None = None, skipped: dict[str, str] | None = None) -> dict[str, Any]:
  """{evaluator name: result} for one encoder, over the evaluators of `evals` (config.evals: name ->
  settings) that apply; an evaluation the data cannot support is left out, with its reason in `skipped`."""
  result = {}
  for name, settings in evals.items():
    if name not in protocols.names("pretrain"):
      raise ValueError(f"config.evals.{name}: no such evaluator (there are {protocols.names('pretrain')})")
    try:
      value = protocols.get("pretrain", name).load().evaluate(embedder, dataset, tokenizer, settings,
                                                              seed=seed, plot_dir=plot_dir)
    except NothingToEvaluate as e:
      logging.warning("%s skipped: %s", name, e)
      if skipped is not None:
        skipped[name] = str(e)
      continue
    if value is not None:
      result[name] = value
  return result


def run_downstream(config, workdir: str, model, weights: dict[str, dict[str, Any]], dataset: Dataset,
                   tokenizer, mesh, run_info: dict[str, Any]) -> dict[str, Any]:
  """Evaluates every {method name: variables} with the evaluators of config.evals and writes the results
  files (process 0 writes)."""
  results = {"run": run_info, "methods": {}}
  skipped = {}
  reading = features_lib.Reading.of(config)
  for i, (name, variables) in enumerate(weights.items()):
    logging.info("Evaluating %s", name)
    embedder = features_lib.Embedder(model, variables, mesh, reading)
    results["methods"][name] = evaluate_method(embedder, dataset, tokenizer, config.evals,
                                               seed=int(config.train.seed),
                                               plot_dir=workdir if i == 0 else None, skipped=skipped)
  if skipped:
    results["run"]["skipped_evaluations"] = skipped
    print("\n".join(f"note: {name} was skipped: {reason}" for name, reason in skipped.items()),
          flush=True)
  if jax.process_index() == 0:
    results_lib.write_results(workdir, results)
    if any("linear_probe" in m for m in results["methods"].values()):
      plots.plot_probe_curves(results, os.path.join(workdir, PROBE_CURVES_PNG))
  return results
