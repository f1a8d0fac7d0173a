"""Orbax checkpoints of a run: train state, data-iterator state and run metadata, saved together.

One `CheckpointManager` in `<workdir>/checkpoints` keeps the last `keep` steps and, in addition, the step
with the best validation metric (an orbax preservation policy, so neither evicts the other). Saves are
asynchronous: training continues while the arrays are written, and a save interrupted by kill -9 is an
unfinished temporary directory that orbax ignores, so the last complete checkpoint is never lost.

Items of one step:
  state  the train-state pytree (StandardSave; restored into the shapes and shardings of a fresh state)
  data   the grain iterator (one small JSON file per process)
  meta   JSON: the config and the step
"""
from __future__ import annotations

import math
import os
from typing import Any

from absl import logging
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


def resolve_step(manager: ocp.CheckpointManager, which: str | int) -> int:
  """The step that `which` names: "best" (lowest validation metric; the latest step, with a warning,
  when no kept step has one), "latest" / "last", or a step number (int or digits)."""
  steps = manager.all_steps()
  if not steps:
    raise CheckpointError(f"no checkpoint in {manager.directory}: train first with "
                          "python -m convirt_jax.main --config=... --workdir=...")
  name = str(which).strip().lower()
  if name in ("latest", "last"):
    return manager.latest_step()
  if name == "best":
    metric = restore_meta(manager, manager.latest_step())["config"]["checkpoint"]["keep_best_metric"]
    step = best_step(manager, metric)
    if step is None:
      logging.warning("no checkpoint in %s has %s (no validation split?): using the latest, step %d",
                      manager.directory, metric, manager.latest_step())
      return manager.latest_step()
    return step
  if name.isdigit():
    if int(name) not in steps:
      raise CheckpointError(f"no checkpoint at step {name} in {manager.directory}; it has steps {steps}")
    return int(name)
  raise CheckpointError(f"checkpoint {which!r}: use 'best', 'latest' (or 'last') or a step number "
                        f"({steps} in {manager.directory})")


def restore_variables(workdir: str, step: int) -> dict[str, Any]:
  """{"params", "batch_stats"} of a step, onto the default device, read without an optimizer template.

  The shapes come from the checkpoint's own metadata and only those two subtrees are read, so loading
  a model for inference or export depends neither on the optimizer settings nor on their state's size.
  """
  reader = ocp.CheckpointManager(
      checkpoint_dir(workdir), options=ocp.CheckpointManagerOptions(read_only=True),
      item_handlers={STATE: ocp.PyTreeCheckpointHandler(), META: ocp.JsonCheckpointHandler()})
  try:
    tree = reader.item_metadata(step)[STATE]
    tree = getattr(tree, "tree", tree)
    missing = [k for k in ("params", "batch_stats") if k not in tree]
    if missing:
      raise CheckpointError(f"the checkpoint at step {step} in {reader.directory} has no {missing}: "
                            "it was not written by convirt_jax")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            {"params": tree["params"], "batch_stats": tree["batch_stats"]})
    args = ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True)})
    return reader.restore(step, args=args)[STATE]
  finally:
    reader.close()


def restore_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  return manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]


def abstract_like(tree: Any) -> Any:
  """Shape/dtype/sharding description of a pytree of arrays, for restoring without holding two copies."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
