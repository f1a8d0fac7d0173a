"""PNG figures of a run: the loss curve, linear-probe curves and text->image retrieval examples.

matplotlib's object API: no pyplot state, no display backend needed.
"""
from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from convirt_jax import storage
from convirt_jax.evaluate import protocols as protocols_lib
from convirt_jax.evaluate.results import (METRIC_NAMES, NON_FINITE, datasets_of, fraction_label,
                                         to_json_ready, validate_results, validate_transfer_results)
from convirt_jax.training.metric_logging import read_metrics

RELEVANT_COLOR, IRRELEVANT_COLOR = "#2ca02c", "#d62728"


def _save(fig: Figure, out_png: str | os.PathLike) -> None:
  storage.makedirs(os.path.dirname(os.fspath(out_png)) or ".")
  with storage.path(out_png).open("wb") as f:
    fig.savefig(f, format="png", dpi=fig.dpi)


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
      if value is None or value in NON_FINITE:
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
  datasets = datasets_of(methods)
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
    ax.set_xticks(sorted(fractions), [fraction_label(f) for f in sorted(fractions)])
    ax.minorticks_off()
    ax.set_xlabel("fraction of training labels")
    ax.set_ylabel(METRIC_NAMES[metric])
    ax.set_title(f"{dataset} linear probe")
    ax.grid(alpha=0.3)
    ax.legend()
  _save(fig, out_png)



def plot_transfer_curves(results: Mapping[str, Any], out_png: str | os.PathLike) -> None:
  """The transfer job's metric against the fraction of training labels (log axis): one panel per
  protocol over fractions (linear, fine-tuning), one line per encoder (error bars = std over seeds);
  single scores (zero-shot), which use no labels, are dashed horizontal lines in every panel."""
  results = to_json_ready(results)
  validate_transfer_results(results)
  methods, metric = results["methods"], results["metric"]
  present = [p for p in protocols_lib.of("transfer") if any(p.name in e for e in methods.values())]
  titles = {p.name: p.title.split(" (")[0] for p in present}
  scores = {(m, p.name): e[p.name]["main"] for p in present if p.result == "scores"
            for m, e in methods.items() if p.name in e and e[p.name]["main"] is not None}
  panels = ([p.name for p in present if p.result == "fractions"]
            or [p.name for p in present if p.result == "scores"][:1])
  fig = Figure(figsize=(5 * len(panels), 4), dpi=110, layout="constrained")
  colors = {m: f"C{i}" for i, m in enumerate(methods)}
  for ax, protocol in zip(np.atleast_1d(fig.subplots(1, len(panels))), panels):
    fractions = set()
    for method, entry in methods.items():
      rows = sorted((r for r in entry.get(protocol, {}).get("fractions", []) if r["mean"] is not None),
                    key=lambda r: r["fraction"])
      if rows:
        fractions.update(r["fraction"] for r in rows)
        ax.errorbar([r["fraction"] for r in rows], [100 * r["mean"] for r in rows],
                    yerr=[100 * (r["std"] or 0.0) for r in rows], marker="o", capsize=4,
                    color=colors[method], label=method)
    for (method, name), value in scores.items():
      ax.axhline(100 * value, ls="--", lw=1.2, color=colors[method], label=f"{method} {titles[name].lower()}")
    if fractions:
      ax.set_xscale("log")
      ax.set_xticks(sorted(fractions), [fraction_label(f) for f in sorted(fractions)])
      ax.minorticks_off()
    ax.set_xlabel("fraction of training labels")
    ax.set_ylabel(METRIC_NAMES[metric])
    ax.set_title(titles[protocol])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  _save(fig, out_png)
