"""Writes evaluation results as results.json and results.md (tables shaped like the paper's), and plots.

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
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath
from matplotlib.figure import Figure

DIRECTIONS = {"image_to_image": "Image→image", "text_to_image": "Text→image"}
METRIC_NAMES = {"auc": "AUC ×100", "accuracy": "accuracy %"}
MISSING = "–"
RELEVANT_COLOR, IRRELEVANT_COLOR = "#2ca02c", "#d62728"
_NON_FINITE = ("nan", "inf", "-inf", "NaN", "Infinity", "-Infinity")  # how JSON writers spell them


# ----------------------------------------------------------------------------------------------------
# results.json / results.md
# ----------------------------------------------------------------------------------------------------

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
  for method, entry in methods.items():
    path = f"results['methods'][{method!r}]"
    _require(entry, (), path)
    unknown = set(entry) - {"linear_probe", "retrieval"}
    if unknown:
      raise ValueError(f"{path}: unknown keys {sorted(unknown)}; expected 'linear_probe', 'retrieval'")
    for key in ("linear_probe", "retrieval"):
      _require(entry.get(key, {}), (), f"{path}[{key!r}]")
    for dataset, probe in entry.get("linear_probe", {}).items():
      probe_path = f"{path}['linear_probe'][{dataset!r}]"
      _require(probe, ("metric", "fractions"), probe_path)
      if probe["metric"] not in METRIC_NAMES:
        raise ValueError(f"{probe_path}['metric']: {probe['metric']!r} not in {sorted(METRIC_NAMES)}")
      for i, row in enumerate(probe["fractions"]):
        _require(row, ("fraction", "mean", "std", "per_label"), f"{probe_path}['fractions'][{i}]")
    for direction, scores in entry.get("retrieval", {}).items():
      retrieval_path = f"{path}['retrieval'][{direction!r}]"
      if direction not in DIRECTIONS:
        raise ValueError(f"{retrieval_path}: unknown direction; expected one of {sorted(DIRECTIONS)}")
      _require(scores, ("ks", "chance"), retrieval_path)
      _require(scores, [f"prec@{k}" for k in scores["ks"]], retrieval_path)


def _pct(value: float | None, digits: int = 1) -> str:
  return MISSING if value is None else f"{100 * value:.{digits}f}"


def _fraction_label(fraction: float) -> str:
  return "All" if fraction == 1.0 else f"{100 * fraction:g}%"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + [":-:"] * (len(header) - 1)) + "|"]
  return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _datasets(methods: Mapping[str, Any]) -> dict[str, tuple[str, list[float]]]:
  """Dataset -> (metric, fractions in first-seen order) over every method."""
  datasets: dict[str, tuple[str, list[float]]] = {}
  for entry in methods.values():
    for dataset, probe in entry.get("linear_probe", {}).items():
      metric, fractions = datasets.setdefault(dataset, (probe["metric"], []))
      if probe["metric"] != metric:
        raise ValueError(f"linear_probe[{dataset!r}]: metric {probe['metric']!r} in one method and "
                         f"{metric!r} in another")
      fractions.extend(r["fraction"] for r in probe["fractions"] if r["fraction"] not in fractions)
  return datasets


def _probe_rows(probe: Mapping[str, Any] | None) -> dict[float, Mapping[str, Any]]:
  return {} if probe is None else {r["fraction"]: r for r in probe["fractions"]}


def _probe_markdown(methods: Mapping[str, Any]) -> list[str]:
  datasets = _datasets(methods)
  if not datasets:
    return []
  header, lines = ["Method"], ["## Linear classification (Table 1)", ""]
  for dataset, (_, fractions) in datasets.items():
    header += [f"{dataset} {_fraction_label(f)}" for f in fractions]
  rows = []
  for method, entry in methods.items():
    row = [method]
    for dataset, (_, fractions) in datasets.items():
      by_fraction = _probe_rows(entry.get("linear_probe", {}).get(dataset))
      for f in fractions:
        r = by_fraction.get(f)
        row.append(MISSING if r is None or r["mean"] is None
                   else f"{_pct(r['mean'])} ± {_pct(r['std'])}")
    rows.append(row)
  lines += _table(header, rows)
  notes = []
  for dataset, (metric, fractions) in datasets.items():
    sizes = {}
    for entry in methods.values():
      for f, r in _probe_rows(entry.get("linear_probe", {}).get(dataset)).items():
        sizes.setdefault(f, sorted(set(np.ravel(r.get("n_train", [])).tolist())))
    size_text = ", ".join(f"{_fraction_label(f)}: {'/'.join(map(str, sizes.get(f, []))) or '?'}"
                          for f in fractions)
    notes.append(f"- {dataset}: {METRIC_NAMES[metric]} (mean ± std over seeds); training examples "
                 f"{size_text}.")
  lines += [""] + notes

  for dataset, (_, fractions) in datasets.items():
    label_names = []
    for entry in methods.values():
      for r in entry.get("linear_probe", {}).get(dataset, {}).get("fractions", []):
        label_names += [n for n in r["per_label"] if n not in label_names]
    rows = []
    for method, entry in methods.items():
      by_fraction = _probe_rows(entry.get("linear_probe", {}).get(dataset))
      for f in fractions:
        if f in by_fraction:
          per_label = by_fraction[f]["per_label"]
          rows.append([method, _fraction_label(f)] + [_pct(per_label.get(n)) for n in label_names])
    lines += ["", f"### {dataset}: per-label AUC ×100 (mean over seeds; {MISSING} = not scorable)", ""]
    lines += _table(["Method", "Label fraction"] + label_names, rows)
  return lines


def _chance(methods: Mapping[str, Any], direction: str) -> float | None:
  """The chance level of a direction, which must agree between methods (same query/candidate sets)."""
  found = {m: e["retrieval"][direction]["chance"] for m, e in methods.items()
           if direction in e.get("retrieval", {})}
  if not found:
    return None
  values = list(found.values())
  if max(values) - min(values) > 1e-9:
    raise ValueError(f"retrieval[{direction!r}]: chance levels differ between methods {found}; "
                     "the methods were scored on different query/candidate sets")
  return values[0]


def _retrieval_markdown(methods: Mapping[str, Any]) -> list[str]:
  directions = [d for d in DIRECTIONS if any(d in e.get("retrieval", {}) for e in methods.values())]
  if not directions:
    return []
  ks = {d: sorted({k for e in methods.values() for k in e.get("retrieval", {}).get(d, {}).get("ks", [])})
        for d in directions}
  header = ["Method"] + [f"{DIRECTIONS[d]} Prec@{k}" for d in directions for k in ks[d]]
  chance = {d: _chance(methods, d) for d in directions}

  def rows(relative: bool) -> list[list[str]]:
    out = [] if relative else [["Chance"] + [_pct(chance[d]) for d in directions for _ in ks[d]]]
    for method, entry in methods.items():
      row = [method]
      for d in directions:
        scores = entry.get("retrieval", {}).get(d, {})
        for k in ks[d]:
          value = scores.get(f"prec@{k}")
          if value is None or (relative and not chance[d]):
            row.append(MISSING)
          else:
            row.append(f"{value / chance[d]:.2f}×" if relative else _pct(value))
      out.append(row)
    return out

  first = next(e["retrieval"][directions[0]] for e in methods.values()
               if directions[0] in e.get("retrieval", {}))
  lines = ["## Retrieval (Table 2)", "",
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
  for section in (_probe_markdown(methods), _retrieval_markdown(methods)):
    if section:
      lines += [""] + section
  return "\n".join(lines) + "\n"


def _write_text(path: epath.Path, text: str) -> None:
  # Written beside and moved into place, so a pre-empted job never leaves half a file.
  tmp = path.parent / f".{path.name}.tmp"
  tmp.write_text(text)
  tmp.replace(path)


def write_results(workdir: str | os.PathLike, results: Mapping[str, Any]) -> tuple[str, str]:
  """Writes workdir/results.json and workdir/results.md; returns their paths."""
  ready = to_json_ready(results)
  validate_results(ready)
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  json_path, md_path = workdir / "results.json", workdir / "results.md"
  _write_text(json_path, json.dumps(ready, indent=2, allow_nan=False, ensure_ascii=False) + "\n")
  _write_text(md_path, results_markdown(ready))
  return os.fspath(json_path), os.fspath(md_path)


# ----------------------------------------------------------------------------------------------------
# Plots (matplotlib's object API: no pyplot state, no display backend needed)
# ----------------------------------------------------------------------------------------------------

def _save(fig: Figure, out_png: str | os.PathLike) -> None:
  out_png = epath.Path(out_png)
  out_png.parent.mkdir(parents=True, exist_ok=True)
  with out_png.open("wb") as f:
    fig.savefig(f, format="png", dpi=fig.dpi)


def read_metrics(metrics_jsonl_path: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl file (one JSON object per line; blank lines skipped)."""
  records = []
  for number, line in enumerate(epath.Path(metrics_jsonl_path).read_text().splitlines(), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{metrics_jsonl_path}:{number}: not valid JSON ({e})") from e
    if not isinstance(record, dict) or "step" not in record:
      raise ValueError(f"{metrics_jsonl_path}:{number}: expected an object with a 'step' key")
    records.append(record)
  return records


def ema(values: Sequence[float], weight: float) -> np.ndarray:
  """Exponential moving average, bias-corrected so the first values are not pulled towards 0."""
  out, average = np.empty(len(values)), 0.0
  for i, value in enumerate(values):
    average = weight * average + (1 - weight) * value
    out[i] = average / (1 - weight ** (i + 1))
  return out


def plot_loss_curve(metrics_jsonl_path: str | os.PathLike, out_png: str | os.PathLike, *,
                    smoothing: float = 0.9, train_key: str = "train/loss", val_key: str = "val/loss",
                    lr_key: str = "lr") -> None:
  """Train loss (raw and smoothed) and validation loss against step, learning rate on a twin axis."""
  records = read_metrics(metrics_jsonl_path)

  def series(key: str) -> tuple[np.ndarray, np.ndarray]:
    pairs = []
    for record in records:
      value = record.get(key)
      if value is None or value in _NON_FINITE:
        continue  # not logged at this step, or a diverged value: a gap in the curve
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{metrics_jsonl_path}: step {record['step']}: {key}={value!r} is not a number")
      if math.isfinite(value):
        pairs.append((record["step"], value))
    pairs.sort()
    return (np.array([p[0] for p in pairs], dtype=float), np.array([p[1] for p in pairs], dtype=float))

  (train_x, train_y), (val_x, val_y), (lr_x, lr_y) = series(train_key), series(val_key), series(lr_key)
  if train_x.size + val_x.size == 0:
    raise ValueError(f"{metrics_jsonl_path}: no {train_key!r} or {val_key!r} values to plot")
  fig = Figure(figsize=(8, 4.5), dpi=110, layout="constrained")
  ax = fig.add_subplot()
  if train_x.size:
    ax.plot(train_x, train_y, color="tab:blue", alpha=0.3, lw=1, label="train")
    ax.plot(train_x, ema(train_y, smoothing), color="tab:blue", lw=2, label=f"train (EMA {smoothing:g})")
  if val_x.size:
    ax.plot(val_x, val_y, "o-", color="tab:orange", lw=2, ms=4, label="validation")
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.grid(alpha=0.3)
  handles, labels = ax.get_legend_handles_labels()
  if lr_x.size:
    lr_ax = ax.twinx()
    lr_ax.plot(lr_x, lr_y, "--", color="tab:gray", lw=1, label="learning rate")
    lr_ax.set_ylabel("learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    lr_ax.set_ylim(bottom=0)
    more_handles, more_labels = lr_ax.get_legend_handles_labels()
    handles, labels = handles + more_handles, labels + more_labels
  # Below the axes: inside, it hides the early steps where train, validation and warm-up all change.
  fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), frameon=False)
  ax.set_title("ConVIRT training loss")
  _save(fig, out_png)


def plot_retrieval_examples(query_texts: Sequence[str], candidate_images_uint8: np.ndarray,
                            topk_indices: np.ndarray, relevant_mask: np.ndarray,
                            out_png: str | os.PathLike) -> None:
  """One row per text query (its text as the row title): its top-k images, framed green if relevant
  (the query's category) and red if not.

  candidate_images_uint8: [M, H, W] or [M, H, W, 1 | 3] uint8. topk_indices: int [Q, k] into it.
  relevant_mask: bool [Q, k].
  """
  images = np.asarray(candidate_images_uint8)
  top = np.asarray(topk_indices)
  relevant = np.asarray(relevant_mask)
  if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1]
                                                                  not in (1, 3)):
    raise ValueError(f"candidate_images_uint8 must be uint8 [M, H, W(, 1|3)], got {images.dtype} "
                     f"{images.shape}")
  if top.ndim != 2 or top.shape[0] != len(query_texts) or relevant.shape != top.shape:
    raise ValueError(f"expected {len(query_texts)} query texts, topk_indices [Q, k] and relevant_mask of "
                     f"the same shape; got topk_indices {top.shape}, relevant_mask {relevant.shape}")
  if top.size and (top.min() < 0 or top.max() >= images.shape[0]):
    raise ValueError(f"topk_indices must index the {images.shape[0]} candidate images")
  if images.ndim == 4 and images.shape[-1] == 1:
    images = images[..., 0]
  num_queries, k = top.shape
  width_inches = 1.6 * k + 0.4
  chars_per_line = int(11 * width_inches)  # about what fits at font size 9
  fig = Figure(figsize=(width_inches, 2.3 * num_queries), dpi=100, layout="constrained")
  for row, subfig in enumerate(np.atleast_1d(fig.subfigures(num_queries, 1))):
    title = textwrap.shorten(" ".join(query_texts[row].split()), width=2 * chars_per_line,
                             placeholder=" …")
    subfig.suptitle(textwrap.fill(title, chars_per_line), fontsize=9, ha="left", x=0.01)
    for col, ax in enumerate(np.atleast_1d(subfig.subplots(1, k))):
      ax.imshow(images[top[row, col]], cmap="gray", vmin=0, vmax=255)
      ax.set_xticks([])
      ax.set_yticks([])
      ax.set_xlabel(f"#{col + 1}", fontsize=8)
      color = RELEVANT_COLOR if relevant[row, col] else IRRELEVANT_COLOR
      for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(4)
  _save(fig, out_png)


def plot_probe_curves(results: Mapping[str, Any], out_png: str | os.PathLike) -> None:
  """Probe metric against the fraction of training labels (log axis), one panel per dataset, one line
  per method, error bars = std over seeds."""
  results = to_json_ready(results)
  validate_results(results)
  methods = results["methods"]
  datasets = _datasets(methods)
  if not datasets:
    raise ValueError("results contain no linear_probe entries to plot")
  fig = Figure(figsize=(5 * len(datasets), 4), dpi=110, layout="constrained")
  for ax, (dataset, (metric, fractions)) in zip(np.atleast_1d(fig.subplots(1, len(datasets))),
                                                datasets.items()):
    for method, entry in methods.items():
      probe_rows = [r for r in entry.get("linear_probe", {}).get(dataset, {}).get("fractions", [])
                    if r["mean"] is not None]
      if probe_rows:
        probe_rows.sort(key=lambda r: r["fraction"])
        ax.errorbar([r["fraction"] for r in probe_rows], [100 * r["mean"] for r in probe_rows],
                    yerr=[100 * r["std"] for r in probe_rows], marker="o", capsize=4, label=method)
    ax.set_xscale("log")
    ax.set_xticks(sorted(fractions), [_fraction_label(f) for f in sorted(fractions)])
    ax.minorticks_off()
    ax.set_xlabel("fraction of training labels")
    ax.set_ylabel(METRIC_NAMES[metric])
    ax.set_title(f"{dataset} linear probe")
    ax.grid(alpha=0.3)
    ax.legend()
  _save(fig, out_png)
