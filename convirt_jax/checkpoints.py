"""Orbax checkpoints of a run: train state, data-iterator state and run metadata, saved together.

One `CheckpointManager` in `<workdir>/checkpoints` keeps the last `keep` steps and, in addition, the step
with the best validation metric (an orbax preservation policy, so neither evicts the other). Saves are
asynchronous: training continues while the arrays are written, and a save interrupted by kill -9 is an
unfinished temporary directory that orbax ignores, so the last complete checkpoint is never lost.

Items of one step:
  state  the train-state pytree (StandardSave; restored into the shapes and shardings of a fresh state)
  data   the grain iterator (one small JSON file per process)
  meta   JSON: the config, the step, the plateau-schedule state, the best metric so far
"""
from __future__ import annotations

import math
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from convirt_jax.errors import CheckpointError

STATE, DATA, META = "state", "data", "meta"
# Beside the checkpoints, written once per run: what rebuilds the model without the original files.
TEXT_CONFIG_FILE = "text_config.json"   # the BertConfig (HF config.json format)
TOKENIZER_DIR = "tokenizer"             # the tokenizer's files


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, *, keep: int = 3, best_metric: str = "val/loss",
                 read_only: bool = False) -> ocp.CheckpointManager:
  def metric(metrics):  # lower is better; a step saved without it never counts as the best
    return metrics.get(best_metric, math.inf)

  policies = [checkpoint_managers.LatestN(n=keep),
              checkpoint_managers.BestN(get_metric_fn=metric, reverse=True, n=1)]
  options = ocp.CheckpointManagerOptions(
      best_fn=metric, best_mode="min",  # makes orbax store each step's metrics
      preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
      enable_async_checkpointing=not read_only, read_only=read_only, create=not read_only,
      cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=(STATE, DATA, META))


def save(manager: ocp.CheckpointManager, step: int, state: Any, *, data_iterator=None,
         meta: dict[str, Any], metrics: dict[str, float] | None = None) -> None:
  """Starts an async save of one step (a no-op if that step is already saved)."""
  if step in manager.all_steps():
    return
  items = {STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)}
  if data_iterator is not None:
    items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
  manager.save(step, args=ocp.args.Composite(**items), metrics=metrics or {}, force=True)


def best_step(manager: ocp.CheckpointManager, metric: str) -> int | None:
  """The kept step with the lowest `metric`, or None when no kept step has it."""
  scored = []
  for step in manager.all_steps():
    metrics = manager.metrics(step) or {}
    if metric in metrics:
      scored.append((metrics[metric], step))
  return min(scored)[1] if scored else None


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any, *,
            data_iterator=None) -> tuple[Any, dict[str, Any]]:
  """Restores `state` (into the shapes/shardings of `abstract_state`), the data iterator in place, meta."""
  items = {STATE: ocp.args.StandardRestore(abstract_state), META: ocp.args.JsonRestore()}
  if data_iterator is not None:
    items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(
        f"the checkpoint at step {step} in {manager.directory} does not fit this model/config "
        f"(was it written with another config?): {e}") from e
  return restored[STATE], restored[META]


def restore_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  return manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]


def abstract_like(tree: Any) -> Any:
  """Shape/dtype/sharding description of a pytree of arrays, for restoring without holding two copies."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
