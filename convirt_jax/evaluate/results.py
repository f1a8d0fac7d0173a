"""Writes evaluation results as results.json and results.md (tables shaped like the paper's), (plots are in `plots.py`).

The results dict (JSON-ready; numpy scalars/arrays are converted, NaN becomes null):

  {
    "run": {...},                 # free-form run information: config name, step, checkpoint, commit, date
    "methods": {                  # one entry per row of the tables, in display order
      "ConVIRT": {
        "linear_probe": {         # optional; dataset name -> linear_probe.linear_probe(...) output
          "CheXpert": {"task", "metric": "auc" | "accuracy", "label_names",
                       "fractions": [{"fraction", "mean", "std", "n_train": [...],
                                      "per_label": {name: float | None}, ...}, ...], ...},
        },
        "retrieval": {            # optional; direction -> retrieval.precision_at_k(...) output
          "image_to_image": {"ks": [5, 10, 50], "prec@5", "prec@10", "prec@50", "chance",
                             "per_category": {...}, ...},
          "text_to_image": {...},
        },
      },
      "Random Init.": {...},
    },
  }

results.md holds a Table 1-like table (rows: methods; columns: each dataset's label fractions; AUC x100
or accuracy in %, mean +- std over seeds), per-label AUC tables, and a Table 2-like table (rows: a chance
row and the methods; columns: Prec@k x100 for image->image and text->image) with Prec@k / chance.
Only the process with index 0 should call these in a multi-host job.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from convirt_jax import storage
from convirt_jax.data import registry
from convirt_jax.evaluate import protocols

# config.data.name -> the data set's name in tables (results of other protocols than the paper's are
# named by their data set, never "Table N").
DIRECTIONS = {"image_to_image": "Image→image", "text_to_image": "Text→image"}
METRIC_NAMES = {"auc": "AUC ×100", "accuracy": "accuracy %"}
MISSING = "–"
NON_FINITE = ("nan", "inf", "-inf", "NaN", "Infinity", "-Infinity")  # how JSON writers spell them


def to_json_ready(value: Any, path: str = "results") -> Any:
  """Plain JSON types: numpy scalars/arrays to Python, tuples to lists, non-finite floats to None."""
  if isinstance(value, Mapping):
    out = {}
    for key, item in value.items():
      if not isinstance(key, str):
        raise TypeError(f"{path}: key {key!r} is not a string (JSON objects need string keys)")
      out[key] = to_json_ready(item, f"{path}[{key!r}]")
    return out
  if isinstance(value, np.ndarray):
    return to_json_ready(value.tolist(), path)
  if isinstance(value, (list, tuple)):
    return [to_json_ready(item, f"{path}[{i}]") for i, item in enumerate(value)]
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  raise TypeError(f"{path}: {type(value).__name__} is not JSON serialisable")


def _require(mapping: Any, keys: Sequence[str], path: str) -> None:
  if not isinstance(mapping, Mapping):
    raise ValueError(f"{path}: expected a dict, got {type(mapping).__name__}")
  for key in keys:
    if key not in mapping:
      raise ValueError(f"{path}: missing key {key!r}")


def validate_results(results: Mapping[str, Any]) -> None:
  """Raises ValueError naming the first key that does not follow the module docstring's structure."""
  _require(results, ("methods",), "results")
  methods = results["methods"]
  if not isinstance(methods, Mapping) or not methods:
    raise ValueError("results['methods']: expected a non-empty dict of method name -> results")
  _check_methods(methods, "pretrain", "keys")


def _check_methods(methods: Mapping[str, Any], job: str, what: str) -> None:
  """Each method's entry: only the job's protocols, each result of its protocol's shape."""
  known = protocols.of(job)
  for method, entry in methods.items():
    path = f"results['methods'][{method!r}]"
    _require(entry, (), path)
    unknown = set(entry) - {p.name for p in known}
    if unknown:
      raise ValueError(f"{path}: unknown {what} {sorted(unknown)}; expected "
                       f"{', '.join(repr(p.name) for p in known)}")
    for protocol in known:
      if protocol.name in entry:
        _CHECKS[protocol.result](entry[protocol.name], f"{path}[{protocol.name!r}]")


def _check_probe(probes: Mapping[str, Any], path: str) -> None:
  _require(probes, (), path)
  for dataset, probe in probes.items():
    probe_path = f"{path}[{dataset!r}]"
    _require(probe, ("metric", "fractions"), probe_path)
    if probe["metric"] not in METRIC_NAMES:
      raise ValueError(f"{probe_path}['metric']: {probe['metric']!r} not in {sorted(METRIC_NAMES)}")
    _check_fraction_rows(probe["fractions"], f"{probe_path}['fractions']")


def _check_fractions(entry: Mapping[str, Any], path: str) -> None:
  _require(entry, ("fractions",), path)
  _check_fraction_rows(entry["fractions"], f"{path}['fractions']")


def _check_scores(entry: Mapping[str, Any], path: str) -> None:
  _require(entry, ("main", "per_label"), path)


def _check_fraction_rows(rows: Sequence[Mapping[str, Any]], path: str) -> None:
  for i, row in enumerate(rows):
    _require(row, ("fraction", "mean", "std", "per_label"), f"{path}[{i}]")


def _check_retrieval(retrieval: Mapping[str, Any], path: str) -> None:
  _require(retrieval, (), path)
  for direction, scores in retrieval.items():
    retrieval_path = f"{path}[{direction!r}]"
    if direction not in DIRECTIONS:
      raise ValueError(f"{retrieval_path}: unknown direction; expected one of {sorted(DIRECTIONS)}")
    _require(scores, ("ks", "chance"), retrieval_path)
    _require(scores, [f"prec@{k}" for k in scores["ks"]], retrieval_path)


_CHECKS = {"probe": _check_probe, "fractions": _check_fractions, "scores": _check_scores,
           "retrieval": _check_retrieval}


def _pct(value: float | None, digits: int = 1) -> str:
  return MISSING if value is None else f"{100 * value:.{digits}f}"


def fraction_label(fraction: float) -> str:
  return "All" if fraction == 1.0 else f"{100 * fraction:g}%"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + [":-:"] * (len(header) - 1)) + "|"]
  return lines + ["| " + " | ".join(row) + " |" for row in rows]


def datasets_of(methods: Mapping[str, Any]) -> dict[str, tuple[str, list[float]]]:
  """Dataset -> (metric, fractions in first-seen order) of pretraining's linear probe, over every method."""
  return _probe_datasets({m: e.get("linear_probe", {}) for m, e in methods.items()})


def _probe_datasets(probes: Mapping[str, Any]) -> dict[str, tuple[str, list[float]]]:
  datasets: dict[str, tuple[str, list[float]]] = {}
  for by_dataset in probes.values():
    for dataset, probe in by_dataset.items():
      metric, fractions = datasets.setdefault(dataset, (probe["metric"], []))
      if probe["metric"] != metric:
        raise ValueError(f"linear_probe[{dataset!r}]: metric {probe['metric']!r} in one method and "
                         f"{metric!r} in another")
      fractions.extend(r["fraction"] for r in probe["fractions"] if r["fraction"] not in fractions)
  return datasets


def _probe_rows(probe: Mapping[str, Any] | None) -> dict[float, Mapping[str, Any]]:
  return {} if probe is None else {r["fraction"]: r for r in probe["fractions"]}


def _mean_std_cell(row: Mapping[str, Any] | None) -> str:
  """A fraction's "mean ± std" (x100) in a Table 1 cell."""
  return MISSING if row is None or row["mean"] is None else f"{_pct(row['mean'])} ± {_pct(row['std'])}"


def _training_sizes(results: Sequence[Mapping[str, Any] | None], fractions: Sequence[float]) -> str:
  """"1%: 20, 10%: 200, All: 2000": each fraction's training examples over the results (their first
  rows with that fraction; several seeds' sizes joined by "/")."""
  sizes = {}
  for result in results:
    for f, r in _probe_rows(result).items():
      sizes.setdefault(f, sorted(set(np.ravel(r.get("n_train", [])).tolist())))
  return ", ".join(f"{fraction_label(f)}: {'/'.join(map(str, sizes.get(f, []))) or '?'}" for f in fractions)


def _probe_markdown(probes: Mapping[str, Any], title: str) -> list[str]:
  """The probe block: {method: {data set: probe result}} -> a Table 1-like table and per-label tables."""
  datasets = _probe_datasets(probes)
  if not datasets:
    return []
  header, lines = ["Method"], [f"## {title}: {', '.join(datasets)}", ""]
  for dataset, (_, fractions) in datasets.items():
    header += [f"{dataset} {fraction_label(f)}" for f in fractions]
  rows = []
  for method, entry in probes.items():
    row = [method]
    for dataset, (_, fractions) in datasets.items():
      by_fraction = _probe_rows(entry.get(dataset))
      for f in fractions:
        row.append(_mean_std_cell(by_fraction.get(f)))
    rows.append(row)
  lines += _table(header, rows)
  notes = []
  for dataset, (metric, fractions) in datasets.items():
    size_text = _training_sizes([entry.get(dataset) for entry in probes.values()], fractions)
    notes.append(f"- {dataset}: {METRIC_NAMES[metric]} (mean ± std over seeds); training examples "
                 f"{size_text}.")
  lines += [""] + notes

  for dataset, (_, fractions) in datasets.items():
    label_names = []
    for entry in probes.values():
      for r in entry.get(dataset, {}).get("fractions", []):
        label_names += [n for n in r["per_label"] if n not in label_names]
    rows = []
    for method, entry in probes.items():
      by_fraction = _probe_rows(entry.get(dataset))
      for f in fractions:
        if f in by_fraction:
          per_label = by_fraction[f]["per_label"]
          rows.append([method, fraction_label(f)] + [_pct(per_label.get(n)) for n in label_names])
    lines += ["", f"### {dataset}: per-label AUC ×100 (mean over seeds; {MISSING} = not scorable)", ""]
    lines += _table(["Method", "Label fraction"] + label_names, rows)
  return lines


def _chance(methods: Mapping[str, Any], direction: str) -> float | None:
  """The chance level of a direction, which must agree between methods (same query/candidate sets)."""
  found = {m: e[direction]["chance"] for m, e in methods.items() if direction in e}
  if not found:
    return None
  values = list(found.values())
  if max(values) - min(values) > 1e-9:
    raise ValueError(f"retrieval[{direction!r}]: chance levels differ between methods {found}; "
                     "the methods were scored on different query/candidate sets")
  return values[0]


def _retrieval_markdown(methods: Mapping[str, Any], dataset: str, title: str) -> list[str]:
  """The retrieval block (Table 2): {method: {direction: scores}} -> Prec@k tables, absolute and
  relative to chance."""
  directions = [d for d in DIRECTIONS if any(d in e for e in methods.values())]
  if not directions:
    return []
  ks = {d: sorted({k for e in methods.values() for k in e.get(d, {}).get("ks", [])})
        for d in directions}
  header = ["Method"] + [f"{DIRECTIONS[d]} Prec@{k}" for d in directions for k in ks[d]]
  chance = {d: _chance(methods, d) for d in directions}

  def rows(relative: bool) -> list[list[str]]:
    out = [] if relative else [["Chance"] + [_pct(chance[d]) for d in directions for _ in ks[d]]]
    for method, entry in methods.items():
      row = [method]
      for d in directions:
        scores = entry.get(d, {})
        for k in ks[d]:
          value = scores.get(f"prec@{k}")
          if value is None or (relative and not chance[d]):
            row.append(MISSING)
          else:
            row.append(f"{value / chance[d]:.2f}×" if relative else _pct(value))
      out.append(row)
    return out

  first = next(e[directions[0]] for e in methods.values() if directions[0] in e)
  lines = [f"## {title}: {dataset}", "",
           f"Prec@k ×100: share of the top k candidates in the query's category "
           f"({first.get('n_candidates', '?')} candidates for {DIRECTIONS[directions[0]].lower()}).", ""]
  lines += _table(header, rows(relative=False))
  lines += ["", "### Prec@k relative to chance", ""]
  lines += _table(header, rows(relative=True))
  return lines


def results_markdown(results: Mapping[str, Any]) -> str:
  """results.md's text."""
  validate_results(results)
  methods = results["methods"]
  lines = ["# ConVIRT evaluation", ""]
  for key, value in results.get("run", {}).items():
    text = value if isinstance(value, str) else json.dumps(to_json_ready(value), ensure_ascii=False)
    lines.append(f"- {key}: {text}")
  name = results.get("run", {}).get("config")
  dataset = registry.title(name) if name in registry.names() else "the evaluation set"
  for protocol in protocols.of("pretrain"):
    of_protocol = {m: e.get(protocol.name, {}) for m, e in methods.items()}  # a row for every method
    if protocol.result == "probe":
      section = _probe_markdown(of_protocol, protocol.title)
    elif protocol.result == "retrieval":
      section = _retrieval_markdown(of_protocol, protocol.table or dataset, protocol.title)
    else:
      raise ValueError(f"pretraining protocol {protocol.name!r}: no renderer for {protocol.result!r} results")
    if section:
      lines += [""] + section
  return "\n".join(lines) + "\n"


def write_results(workdir: str | os.PathLike, results: Mapping[str, Any]) -> tuple[str, str]:
  """Writes workdir/results.json and workdir/results.md; returns their paths."""
  ready = to_json_ready(results)
  validate_results(ready)
  return _write_json_and_markdown(workdir, ready, results_markdown(ready))


def _write_json_and_markdown(workdir: str | os.PathLike, ready: Mapping[str, Any],
                             markdown: str) -> tuple[str, str]:
  json_path, md_path = os.path.join(workdir, "results.json"), os.path.join(workdir, "results.md")
  storage.write_text(json_path, json.dumps(ready, indent=2, allow_nan=False, ensure_ascii=False) + "\n")
  storage.write_text(md_path, markdown)  # each atomic: a pre-empted job never leaves half a file
  return json_path, md_path



# ----------------------------------------------------------------------------------------------------
# The transfer job (convirt_jax.transfer): results.json / results.md shaped like the paper's Table 1.
#
#   {"run": {...}, "dataset": title, "task", "metric": "auc" | "accuracy", "label_names": [...],
#    "methods": {row: {"linear": linear_probe output, "finetune": finetune.summarise output,
#                      "zeroshot": zeroshot.evaluate_zeroshot output,
#                      "retrieval": {"image_to_image", "text_to_image": chexpert_retrieval output}}}}
# "metric" (and "task", "label_names") only when a classification protocol ran: the CheXpert 8x200
# retrieval alone has none. Its block is the paper's Table 2 shape.

def validate_transfer_results(results: Mapping[str, Any]) -> None:
  """Raises ValueError naming the first key that does not follow the structure above."""
  classifying = [p.name for p in protocols.of("transfer") if p.result in ("fractions", "scores")]
  classification = any(p in e for e in results.get("methods", {}).values() if isinstance(e, Mapping)
                       for p in classifying)
  _require(results, ("methods", "metric") if classification else ("methods",), "results")
  if "metric" in results and results["metric"] not in METRIC_NAMES:
    raise ValueError(f"results['metric']: {results['metric']!r} not in {sorted(METRIC_NAMES)}")
  _check_methods(results["methods"], "transfer", "protocols")


def _fractions_of(results: Mapping[str, Any]) -> list[float]:
  fractions = []
  for result in results.values():
    for row in result.get("fractions", []):
      if row["fraction"] not in fractions:
        fractions.append(row["fraction"])
  return sorted(fractions)


def _fractions_block(results: Mapping[str, Any], title: str, unit: str) -> list[str]:
  """A Table 1 block: {method: fractions result} -> rows: methods; columns: label fractions."""
  fractions = _fractions_of(results)
  if not fractions:
    return []
  rows = []
  for method, result in results.items():
    by_fraction = _probe_rows(result)
    if by_fraction:
      rows.append([method] + [_mean_std_cell(by_fraction.get(f)) for f in fractions])
  size_text = _training_sizes(list(results.values()), fractions)
  return (["", f"## {title}", ""] + _table(["Method"] + [fraction_label(f) for f in fractions], rows)
          + ["", f"{unit}, mean ± std over seeds; training examples {size_text}."])


def _fractions_per_label(results: Mapping[str, Any], title: str, label_names: list[str]) -> list[str]:
  rows = [[method, fraction_label(f)] + [_pct(r["per_label"].get(n)) for n in label_names]
          for method, result in results.items() for f, r in sorted(_probe_rows(result).items())]
  return ["", f"### {title}", ""] + _table(["Method", "Label fraction"] + label_names, rows) if rows else []


def _scores_block(results: Mapping[str, Any], title: str, unit: str) -> list[str]:
  return ["", f"## {title}", ""] + _table(["Method", unit], [[m, _pct(z["main"])] for m, z in results.items()])


def _scores_per_label(results: Mapping[str, Any], title: str, label_names: list[str]) -> list[str]:
  return ["", f"### {title.split(' (')[0]}", ""] + _table(
      ["Method"] + label_names, [[m] + [_pct(z["per_label"].get(n)) for n in label_names]
                                 for m, z in results.items()])


def transfer_markdown(results: Mapping[str, Any]) -> str:
  """results.md of the transfer job: each protocol's block in registration order (`protocols.py`): a
  Table 1 block per fractions protocol (rows: encoders; columns: label fractions; mean ± std over seeds),
  the zero-shot scores, the CheXpert 8x200 retrieval (Table 2 shape); then the per-label tables and the
  excluded labels."""
  validate_transfer_results(results)
  methods, metric = results["methods"], results.get("metric")
  unit = METRIC_NAMES.get(metric, "")
  lines = [f"# ConVIRT transfer: {results.get('dataset', '')}".rstrip(), ""]
  for key, value in results.get("run", {}).items():
    text = value if isinstance(value, str) else json.dumps(to_json_ready(value), ensure_ascii=False)
    lines.append(f"- {key}: {text}")
  by_protocol = {p: {m: e[p.name] for m, e in methods.items() if p.name in e} for p in protocols.of("transfer")}
  for protocol, of_protocol in by_protocol.items():
    if protocol.result == "fractions":
      lines += _fractions_block(of_protocol, protocol.title, unit)
    elif protocol.result == "scores" and of_protocol:
      lines += _scores_block(of_protocol, protocol.title, unit)
    elif protocol.result == "retrieval" and of_protocol:
      lines += [""] + _retrieval_markdown(of_protocol, protocol.table, protocol.title)
  label_names = list(results.get("label_names", []))
  if label_names:
    lines += ["", f"## Per label ({unit}; {MISSING} = not scorable)"]
    for protocol, of_protocol in by_protocol.items():
      if protocol.result == "fractions":
        lines += _fractions_per_label(of_protocol, protocol.title, label_names)
      elif protocol.result == "scores" and of_protocol:
        lines += _scores_per_label(of_protocol, protocol.title, label_names)
  excluded = [f"- {method} / {protocol}: {name}: {reason}"
              for method, entry in methods.items() for protocol, value in entry.items()
              for name, reason in value.get("excluded_labels", {}).items()]
  if excluded:
    lines += ["", "## Excluded labels", ""] + excluded
  return "\n".join(lines) + "\n"


def write_transfer_results(workdir: str | os.PathLike, results: Mapping[str, Any]) -> tuple[str, str]:
  """Writes workdir/results.json and workdir/results.md of the transfer job; returns their paths."""
  ready = to_json_ready(results)
  validate_transfer_results(ready)
  return _write_json_and_markdown(workdir, ready, transfer_markdown(ready))
